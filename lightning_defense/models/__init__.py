"""Models: the ImageClassifier LightningModule and its backbones."""

from lightning_defense.models.airbench import AirbenchNet
from lightning_defense.models.augment import random_crop_flip
from lightning_defense.models.backbones import BACKBONES, CifarResNet18, SmallCNN, build_backbone
from lightning_defense.core.recipe import paper_milestones
from lightning_defense.models.classifier import ImageClassifier
from lightning_defense.models.fast import FastImageClassifier, Lookahead

__all__ = [
    "AirbenchNet",
    "BACKBONES",
    "CifarResNet18",
    "FastImageClassifier",
    "ImageClassifier",
    "Lookahead",
    "SmallCNN",
    "build_backbone",
    "paper_milestones",
    "random_crop_flip",
]

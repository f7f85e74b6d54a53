"""Models: the ImageClassifier LightningModule and its backbones."""

from lightning_defense.models.augment import random_crop_flip
from lightning_defense.models.backbones import BACKBONES, CifarResNet18, SmallCNN, build_backbone
from lightning_defense.core.recipe import paper_milestones
from lightning_defense.models.classifier import ImageClassifier

__all__ = [
    "BACKBONES",
    "CifarResNet18",
    "ImageClassifier",
    "SmallCNN",
    "build_backbone",
    "paper_milestones",
    "random_crop_flip",
]

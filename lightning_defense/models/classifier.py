"""ImageClassifier: a LightningModule around any backbone, with the poisoning papers' recipe."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_defense.core.batch import unpack_batch
from lightning_defense.core.recipe import paper_milestones, sgd_with_steps
from lightning_defense.models.augment import random_crop_flip
from lightning_defense.models.backbones import build_backbone


class ImageClassifier(L.LightningModule):
    """Classifier that takes un-normalised [0,1] batches, augments, normalises, and classifies.

    Defaults follow the poisoning papers (FRIENDS, Hong et al.): SGD with Nesterov momentum 0.9,
    lr 0.1, weight decay 5e-4, and a x0.1 step schedule at 3/8, 5/8 and 7/8 of training.

    Args:
        backbone: A name (``small_cnn``, ``resnet18_cifar`` or any timm model) or an ``nn.Module``.
        num_classes: Number of classes (linked from the datamodule by the CLI).
        in_chans: Input channels (linked from the datamodule by the CLI).
        mean: Per-channel normalisation mean (a float is broadcast).
        std: Per-channel normalisation std.
        lr, momentum, nesterov, weight_decay: SGD settings.
        milestones: Epochs at which lr is multiplied by ``gamma``; None uses :func:`paper_milestones`.
        gamma: Step factor.
        crop_padding: Random-crop padding in pixels (0 disables cropping).
        flip: Random horizontal flips (off for digits, where a flip changes meaning).
        backbone_kwargs: Extra arguments for a named backbone.

    Example::

        model = ImageClassifier("small_cnn", num_classes=10, in_chans=1, flip=False)
        trainer = L.Trainer(max_epochs=5)
        trainer.fit(model, datamodule=DigitsDataModule())
    """

    def __init__(
        self,
        backbone: Union[str, nn.Module] = "small_cnn",
        num_classes: int = 10,
        in_chans: int = 3,
        mean: Union[float, Sequence[float]] = 0.5,
        std: Union[float, Sequence[float]] = 0.5,
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        milestones: Optional[list[int]] = None,
        gamma: float = 0.1,
        crop_padding: int = 4,
        flip: bool = True,
        backbone_kwargs: Optional[dict] = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2; got {num_classes}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0; got {lr}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0; got {crop_padding}")
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        self.backbone = (
            backbone if isinstance(backbone, nn.Module) else build_backbone(backbone, num_classes, in_chans, **(backbone_kwargs or {}))
        )
        self.num_classes = num_classes
        self.register_buffer("mean", self._per_channel("mean", mean, in_chans))
        self.register_buffer("std", self._per_channel("std", std, in_chans))
        if (self.std <= 0).any():
            raise ValueError(f"std must be > 0; got {std}")
        self.train_acc, self.val_acc, self.test_acc = (MulticlassAccuracy(num_classes, average="micro") for _ in range(3))

    @staticmethod
    def _per_channel(name: str, value, channels: int) -> Tensor:
        t = torch.as_tensor(value, dtype=torch.float32).flatten()
        if t.numel() == 1:
            t = t.repeat(channels)
        if t.numel() != channels:
            raise ValueError(f"{name} needs 1 or in_chans={channels} values; got {t.numel()}")
        return t.view(1, channels, 1, 1)

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: Tensor) -> Tensor:
        """Logits for un-normalised images in [0, 1]."""
        return self.backbone(self.normalize(x))

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y, _ = unpack_batch(batch)
        x = random_crop_flip(x, self.hparams.crop_padding, self.hparams.flip)
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _evaluate(self, batch, stage: str, metric: MulticlassAccuracy) -> None:
        x, y, _ = unpack_batch(batch)
        logits = self(x)
        metric(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{stage}/acc", metric, prog_bar=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        x, _, _ = unpack_batch(batch)
        return self(x).argmax(dim=1)

    def recipe(self) -> dict:
        """The keyword arguments of :func:`~lightning_defense.core.recipe.sgd_with_steps` this model trains with."""
        hp = self.hparams
        return {"lr": hp.lr, "momentum": hp.momentum, "nesterov": hp.nesterov, "weight_decay": hp.weight_decay,
                "milestones": hp.milestones, "gamma": hp.gamma}

    def configure_optimizers(self):
        hp = self.hparams
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 80
        optimizer, scheduler = sgd_with_steps(self.parameters(), max_epochs, **self.recipe())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

"""Transfer learning's victim (Shafahi et al. 2018; Aghakhani et al. 2021): a frozen extractor, a fresh head.

Feature-collision attacks (Poison Frogs, Bullseye Polytope) assume the victim takes a publicly known,
pretrained feature extractor, keeps it fixed, and trains only a new linear classifier on the (poisoned)
training set. This callback turns any :class:`~lightning_defense.models.ImageClassifier` into that
victim: it optionally loads the extractor's weights, then freezes every backbone parameter except the
head's and keeps the backbone's BatchNorm layers in eval mode, so the features are exactly the extractor's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import lightning as L
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from lightning_defense.callbacks.pretrained_init import _check_file, head_module, load_backbone, load_state_dict_file


class LinearProbe(Callback):
    """Load a feature extractor (optional), freeze it, and train only the classifier head.

    In ``setup(stage="fit")`` -- before Lightning wraps the model for DDP, so frozen parameters are not
    synchronised -- the backbone is loaded from ``checkpoint_path`` (its head keeps the fresh
    initialisation, see :class:`PretrainedInit`) and every parameter outside the head gets
    ``requires_grad=False``. Before every training batch the modules outside the head are put in eval mode:
    BatchNorm then uses (and keeps) the extractor's running statistics, as a fixed extractor must.

    Args:
        checkpoint_path: A ``.safetensors`` file (or a ``.pt``/``.pth``/``.ckpt`` read with
            ``weights_only=True``) holding the extractor's state dict; None freezes the weights the
            backbone already has (e.g. loaded by :class:`PretrainedInit`).
        backbone_attr: Attribute of the LightningModule that holds the network.
        strict: Fail on parameters missing from, or unexpected in, the checkpoint (the head aside).

    Raises:
        FileNotFoundError: If ``checkpoint_path`` does not exist.
        ValueError: If it has an unsupported suffix, or the backbone has no head to train.

    Example::

        model = ImageClassifier("small_cnn", num_classes=10, in_chans=1, backbone_kwargs={"width": 8})
        trainer = L.Trainer(callbacks=[LinearProbe(checkpoint_path="runs/extractor.safetensors")])
    """

    def __init__(self, checkpoint_path: Optional[Union[str, Path]] = None, backbone_attr: str = "backbone",
                 strict: bool = True) -> None:
        if checkpoint_path is not None:
            _check_file("checkpoint_path", checkpoint_path, (".safetensors", ".pt", ".pth", ".ckpt", ".bin"))
        self.checkpoint_path = checkpoint_path
        self.backbone_attr = backbone_attr
        self.strict = strict

    @property
    def state_key(self) -> str:
        return self._generate_state_key(checkpoint_path=str(self.checkpoint_path))

    def _parts(self, pl_module: L.LightningModule) -> tuple[nn.Module, nn.Module]:
        backbone = getattr(pl_module, self.backbone_attr, None) if self.backbone_attr else pl_module
        if not isinstance(backbone, nn.Module):
            raise AttributeError(f"{type(pl_module).__name__} has no module attribute {self.backbone_attr!r}; set "
                                 "backbone_attr to the attribute holding the network")
        head = head_module(backbone)
        if head is None:
            raise ValueError(f"LinearProbe: {type(backbone).__name__} has no classifier head (get_classifier() or "
                             "fc) to train")
        return backbone, head

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        backbone, head = self._parts(pl_module)
        if self.checkpoint_path is not None:
            state = load_state_dict_file(self.checkpoint_path)
            load_backbone(backbone, state, reset_head=True, strict=self.strict, source=repr(str(self.checkpoint_path)))
        trainable = {id(p) for p in head.parameters()}
        for p in pl_module.parameters():
            p.requires_grad_(id(p) in trainable)
        rank_zero_info(f"LinearProbe: training {sum(p.numel() for p in head.parameters())} head parameters of "
                       f"{type(backbone).__name__}; the rest is frozen")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        backbone, head = self._parts(pl_module)
        backbone.eval()  # BatchNorm keeps the extractor's statistics
        head.train()

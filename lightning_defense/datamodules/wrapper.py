"""Wrapping a user's datamodule: rewrite its training split, pass validation and test through."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_defense.core.collective import Collective
from lightning_defense.core.rng import generator
from lightning_defense.datamodules.base import ImageDataModule


class TrainSplitWrapper(ImageDataModule):
    """Base of every wrapper that rewrites only the training split of ``base``.

    Subclasses implement :meth:`wrap_train`, the fixed rewrite of the training split (sample i stays sample
    i), and may add :meth:`train_batch_transform`, a fresh random rewrite of every training batch. A
    wrapper that can serve as the certification loop's smoothing states the noise it certifies as
    ``certified_sigma``: the std (in [0, 1] pixels) of the Gaussian N(0, sigma^2 I) its training data holds
    on every sample, or None (e.g. ``EclipseDataModule(diffusion=False)``); a wrapper without it (e.g. ISS,
    Deep k-NN) certifies nothing. ``num_classes``, ``num_channels`` and the loader settings
    (batch size, workers, and :attr:`loader_seed`, the shuffling seed) come from ``base``; validation and
    test sets are ``base``'s, untouched. A wrapper keeps its own arguments under their own names: its
    ``seed`` (None when it takes none) is its own random draw, never ``base``'s.

    Args:
        base: Any datamodule that yields ``(images, labels, indices)`` and sets ``train_set``,
            ``val_set`` and ``test_set`` in ``setup``.
    """

    def __init__(self, base: L.LightningDataModule) -> None:
        if not isinstance(base, L.LightningDataModule):
            raise TypeError(f"base must be a LightningDataModule; got {type(base).__name__}")
        super().__init__(
            batch_size=getattr(base, "batch_size", 128),
            num_workers=getattr(base, "num_workers", 0),
            seed=None,
        )
        self.base = base
        self.num_classes = getattr(base, "num_classes", None)
        self.num_channels = getattr(base, "num_channels", None)
        self._collective: Collective | None = None
        self._train_batch_calls = (-1, -1, 0)  # (epoch, global step, calls within that step)

    @property
    def loader_seed(self) -> int:
        """``base``'s shuffling seed: wrapping a datamodule does not change the order of its training batches."""
        return getattr(self.base, "loader_seed", getattr(self.base, "seed", 0))

    def use_collective(self, collective: Collective) -> None:
        """Share offline work with these ranks (e.g. a Fabric's) when no Trainer is attached."""
        self._collective = collective

    def collective(self) -> Collective:
        """The ranks this datamodule shares its offline work with: the attached Trainer's strategy, or
        the one given to :meth:`use_collective`, or this process alone."""
        if self._collective is not None:
            return self._collective
        return Collective.of(getattr(self, "trainer", None))

    def prepare_data(self) -> None:
        self.base.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.base.setup(stage)
        for name in ("train_set", "val_set", "test_set"):
            if getattr(self.base, name, None) is None:
                raise AttributeError(
                    f"{type(self.base).__name__} has no {name} after setup(); a wrapped datamodule must expose "
                    "train_set, val_set and test_set datasets yielding (image, label, index)"
                )
        self.val_set, self.test_set = self.base.val_set, self.base.test_set
        if self.train_set is None:
            self.train_set = self.wrap_train(self.base.train_set)

    def wrap_train(self, train_set: Dataset) -> Dataset:
        raise NotImplementedError

    # -- the per-batch rewrite: the same in ``fit`` and in the certification loop's training ----------
    def train_batch_transform(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """A fresh random rewrite of one training batch, on top of :meth:`wrap_train` (default: none).

        ``fit`` applies it to every training batch once it is on the device (before callbacks and the model's
        crop/flip), drawing from :meth:`train_batch_generator`; the certification loop applies it to every
        batch of its models, drawing from one keyed stream per model. Its draws come from ``generator``
        (a CPU generator) alone.

        Args:
            images: (B, C, H, W) training images, on the training device.
            generator: The CPU generator of the draws.
        """
        return images

    def train_batch_generator(self, epoch: int, step: int, rank: int = 0, call: int = 0) -> torch.Generator:
        """The CPU generator of one ``fit`` batch's :meth:`train_batch_transform`: the :mod:`core.rng
        <lightning_defense.core.rng>` stream keyed by ``(seed, epoch, global step, rank, call within the step)``."""
        return generator(self.seed or 0, epoch, step, rank, call)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """:meth:`train_batch_transform` on training batches only (a wrapper that defines one)."""
        trainer = getattr(self, "trainer", None)
        if (trainer is None or not trainer.training
                or type(self).train_batch_transform is TrainSplitWrapper.train_batch_transform):
            return batch
        epoch, step = trainer.current_epoch, trainer.global_step
        last_epoch, last_step, calls = self._train_batch_calls
        calls = calls + 1 if (epoch, step) == (last_epoch, last_step) else 0
        self._train_batch_calls = (epoch, step, calls)
        images, *rest = batch
        return [self.train_batch_transform(images, self.train_batch_generator(epoch, step, trainer.global_rank, calls)),
                *rest]

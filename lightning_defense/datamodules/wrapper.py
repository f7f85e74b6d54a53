"""Wrapping a user's datamodule: rewrite its training split, pass validation and test through."""

from __future__ import annotations

import lightning as L
from torch.utils.data import Dataset

from lightning_defense.core.collective import Collective
from lightning_defense.datamodules.base import ImageDataModule


class TrainSplitWrapper(ImageDataModule):
    """Base of every wrapper that rewrites only the training split of ``base``.

    Subclasses implement :meth:`wrap_train`. ``num_classes``, ``num_channels`` and the loader settings
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

"""The base LightningDataModule of this package's datasets, and the split helpers.

The batch format is :mod:`lightning_defense.core.batch`.

"""

from __future__ import annotations

from typing import Optional

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_defense.core.batch import dataset_tensors


def check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1); got {value}")


def check_split_args(num_channels: int, val_fraction: float, test_fraction: float) -> None:
    """Shared argument checks of the datamodules that split one image set into train/val/test."""
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 or 3; got {num_channels}")
    check_fraction("val_fraction", val_fraction)
    check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must leave training data; got {val_fraction} + {test_fraction}"
        )


class ImageDataModule(L.LightningDataModule):
    """Base class: subclasses set ``train_set``, ``val_set`` and ``test_set`` in ``setup``.

    Subclasses also provide ``num_classes`` and ``num_channels`` right after ``__init__`` so the CLI
    can link them to the model.

    Args:
        batch_size: Batch size of every loader.
        num_workers: DataLoader worker processes.
        seed: Seed for the split and for shuffling the training loader (see :attr:`loader_seed`).
    """

    num_classes: int
    num_channels: int

    def __init__(self, batch_size: int = 128, num_workers: int = 0, seed: Optional[int] = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0; got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None

    @property
    def loader_seed(self) -> int:
        """The seed of the training loader's shuffling: this datamodule's ``seed``."""
        return self.seed

    def train_tensors(self) -> tuple[Tensor, Tensor]:
        """The whole training split as ``(images in [0,1], labels)``, in index order."""
        return dataset_tensors(self._require("train_set"))

    def _require(self, name: str) -> Dataset:
        dataset = getattr(self, name)
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.{name} is not set: call setup() first")
        return dataset

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.loader_seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            generator=generator,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._require("train_set"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._require("val_set"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._require("test_set"), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


def seeded_split(n: int, fractions: tuple[float, ...], seed: int) -> list[Tensor]:
    """Split ``range(n)`` reproducibly: one index tensor per fraction, the remainder last."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for fraction in fractions:
        size = int(round(fraction * n))
        parts.append(perm[start : start + size].sort().values)
        start += size
    parts.append(perm[start:].sort().values)
    return parts

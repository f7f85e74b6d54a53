"""The data layer's shared pieces: the batch format and a base LightningDataModule.

Batch format
------------
Every datamodule of this package yields batches ``(images, labels, indices)``:

* ``images``: float32 in [0, 1], shaped (N, C, H, W), **not normalised**;
* ``labels``: int64 class indices;
* ``indices``: int64, each sample's index in its split.

The order in which things happen to a training batch is:

1. data-rewriting defenses (purifying datamodule wrappers) act offline, before training;
2. training-time defenses (callbacks such as ``FriendsNoise``) act in ``on_train_batch_start``,
   on the un-normalised batch already on the device, and use ``indices`` for per-sample state;
3. the model's ``training_step`` applies random crop/flip augmentation, then normalisation.

A user's own datamodule fits by yielding the same triple: wrap its datasets in
:class:`IndexedDataset` or return ``(image, label, index)`` from ``__getitem__``, and leave
augmentation and normalisation to the LightningModule (see ``ImageClassifier``).
"""

from __future__ import annotations

from typing import Optional

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset


class IndexedDataset(Dataset):
    """Images and labels held as tensors; items are ``(image, label, index)``.

    Args:
        images: (N, C, H, W) float in [0, 1], or uint8 in [0, 255] (converted per item, which keeps
            large sets compact in memory).
        labels: (N,) integer class labels.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be shaped (N, C, H, W); got shape {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return to_float_image(self.images[index]), self.labels[index], index

    def tensors(self) -> tuple[Tensor, Tensor]:
        """All images as float in [0, 1] and all labels."""
        return to_float_image(self.images), self.labels


def to_float_image(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float [0, 1]; float input is returned as float32."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def dataset_tensors(dataset: Dataset, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """Materialise a dataset of ``(image, label, index)`` items as ``(images, labels)`` in index order."""
    if isinstance(dataset, IndexedDataset):
        return dataset.tensors()
    images, labels = [], []
    for x, y, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels).long()


def unpack_batch(batch) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Split a batch into ``(images, labels, indices)``; ``indices`` is None for a plain ``(x, y)`` batch."""
    if isinstance(batch, (list, tuple)):
        if len(batch) == 3:
            return batch[0], batch[1], batch[2]
        if len(batch) == 2:
            return batch[0], batch[1], None
    raise ValueError(
        "expected a batch (images, labels, indices) or (images, labels); got "
        f"{type(batch).__name__} of length {len(batch) if hasattr(batch, '__len__') else '?'}"
    )


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
        seed: Seed for the split and for shuffling the training loader.
    """

    num_classes: int
    num_channels: int

    def __init__(self, batch_size: int = 128, num_workers: int = 0, seed: int = 0) -> None:
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

    def train_tensors(self) -> tuple[Tensor, Tensor]:
        """The whole training split as ``(images in [0,1], labels)``, in index order."""
        return dataset_tensors(self._require("train_set"))

    def _require(self, name: str) -> Dataset:
        dataset = getattr(self, name)
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.{name} is not set: call setup() first")
        return dataset

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
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

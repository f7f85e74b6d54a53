"""The base LightningDataModule of this package's datasets, and the split helpers.

The batch format is :mod:`lightning_defense.core.batch`.

"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from lightning_defense.core.batch import dataset_tensors
from lightning_defense.core.seam import DATASET, TrainingDataSeam


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


class EpochShuffle(RandomSampler):
    """A new order every epoch, a function of ``(seed, epoch)`` only: rebuilding the loader or resuming a
    fit from a checkpoint continues the orders of an uninterrupted fit.

    Epoch ``e``'s order is ``randperm(n)`` from a generator seeded with ``seed + e``: the order of
    ``DistributedSampler(data_source, shuffle=True, seed=seed)`` on one process. Lightning calls
    :meth:`set_epoch` at the start of every epoch (with the restored epoch on resume), and
    :class:`ImageDataModule` once more as the loader is built (see :func:`start_samplers_at_fit_epoch`).
    A pass without :meth:`set_epoch` (a plain loop, or a batch sampler wrapped so that Lightning cannot
    reach it) takes the next epoch's order, so every pass is a new order, as with ``shuffle=True``.

    Under DDP Lightning replaces it (a ``RandomSampler``) by its own ``DistributedSampler``, seeded with
    ``seed_everything``'s seed: rank ``r`` of ``W`` reads positions ``r, r + W, ...`` of the same per-epoch
    permutation when ``seed_everything`` was given the loader's seed (every config in ``configs/`` does), and
    of another permutation otherwise; a resumed DDP fit must then use the same ``seed_everything``.
    """

    def __init__(self, data_source: Dataset, seed: int) -> None:
        super().__init__(data_source)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"the training loader's shuffling needs an int seed; got {seed!r}")
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1  # runs when the pass starts, not when a loader calls iter()
        generator = torch.Generator().manual_seed(self.seed + epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


def start_samplers_at_fit_epoch(trainer: L.Trainer) -> None:
    """Set the training loader's samplers to the fit loop's epoch when the loader is built.

    Lightning calls ``set_epoch`` when an epoch starts, but DataLoader workers start drawing indices when
    the loader's iterator is made, which on resume (and on the first epoch of every rebuilt loader) comes
    earlier: a resumed fit would replay epoch 0's order, with ``EpochShuffle`` and with Lightning's
    ``DistributedSampler`` alike. A transform at the training-data seam hands them the epoch first.
    """

    def transform(loader: Any, is_train: bool) -> Any:
        if is_train:
            epoch = trainer.fit_loop.epoch_progress.current.processed  # what the fit loop passes to set_epoch
            batch_sampler = getattr(loader, "batch_sampler", None)
            samplers = (getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None))
            for sampler in {id(s): s for s in samplers if s is not None}.values():
                if callable(getattr(sampler, "set_epoch", None)):
                    sampler.set_epoch(epoch)
        return loader

    TrainingDataSeam.of(trainer).add("sampler-epoch", transform, DATASET)


class ImageDataModule(L.LightningDataModule):
    """Base class: subclasses set ``train_set``, ``val_set`` and ``test_set`` in ``setup``.

    Subclasses also provide ``num_classes`` and ``num_channels`` right after ``__init__`` so the CLI
    can link them to the model.

    Args:
        batch_size: Batch size of every loader.
        num_workers: DataLoader worker processes.
        seed: Seed for the split and for shuffling the training loader (see :attr:`loader_seed` and
            :class:`EpochShuffle`).
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
        """A loader over ``dataset``; ``shuffle``: in the per-epoch order of :class:`EpochShuffle`.

        The shuffled loader keeps a generator of its own for the workers' base seeds, so that iterating it
        leaves the global RNG alone (no dataset here draws in its workers).
        """
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffle(dataset, self.loader_seed) if shuffle else None,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.loader_seed) if shuffle else None,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None:
            start_samplers_at_fit_epoch(self.trainer)
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

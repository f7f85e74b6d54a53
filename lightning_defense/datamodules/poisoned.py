"""Apply a clean-label poison set to any datamodule's training split."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import lightning as L
from torch.utils.data import Dataset

from lightning_defense.core.batch import IndexedDataset, dataset_tensors
from lightning_defense.datamodules.poison import PoisonSet
from lightning_defense.datamodules.wrapper import TrainSplitWrapper


class PoisonedDataModule(TrainSplitWrapper):
    """``base`` with the samples named by a :class:`PoisonSet` replaced by their poisoned versions.

    The poison set is validated against the base training split (indices, shapes, bound, clean labels)
    before it is applied. Validation and test data stay untouched.

    Args:
        base: The clean datamodule.
        poisons: A :class:`PoisonSet` or the path of one saved as ``.safetensors`` or ``.npz``.

    Example::

        dm = PoisonedDataModule(DigitsDataModule(), poisons="poisons.safetensors")
    """

    def __init__(self, base: L.LightningDataModule, poisons: Union[str, Path, PoisonSet]) -> None:
        super().__init__(base)
        if not isinstance(poisons, (str, Path, PoisonSet)):
            raise TypeError(f"poisons must be a PoisonSet or a file path; got {type(poisons).__name__}")
        self.poisons = poisons
        self.poison_set: PoisonSet | None = None

    def wrap_train(self, train_set: Dataset) -> Dataset:
        images, labels = dataset_tensors(train_set)
        if isinstance(self.poisons, PoisonSet):
            self.poisons.validate(images, labels)
            self.poison_set = self.poisons
        else:
            self.poison_set = PoisonSet.load(self.poisons, base_images=images, base_labels=labels)
        return IndexedDataset(self.poison_set.apply(images), labels)

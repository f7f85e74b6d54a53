"""Datamodules: the embedded digits, CIFAR-10, image folders, poison sets and wrappers.

Every datamodule yields ``(images in [0,1], labels, indices)``; see :mod:`lightning_defense.core.batch`.
"""

from lightning_defense.core.batch import IndexedDataset, dataset_tensors, unpack_batch
from lightning_defense.datamodules.base import ImageDataModule
from lightning_defense.datamodules.cifar10 import CIFAR10DataModule, read_cifar10
from lightning_defense.datamodules.deep_knn import DeepKNNFilterDataModule
from lightning_defense.datamodules.diffusion_purified import DiffusionPurifiedDataModule
from lightning_defense.datamodules.digits import DigitsDataModule, load_digits_tensors
from lightning_defense.datamodules.eclipse import EclipseDataModule
from lightning_defense.datamodules.fashion_mnist import FashionMNISTDataModule
from lightning_defense.datamodules.image_folder import ImageFolderDataModule
from lightning_defense.datamodules.importers import (
    UntrustedPickleError,
    from_benchmark_pickles,
    from_npy,
    from_poisoned_arrays,
)
from lightning_defense.core.rng import per_sample_normal
from lightning_defense.datamodules.noise import GaussianNoiseDataModule
from lightning_defense.datamodules.poison import PoisonSet, PoisonSetError
from lightning_defense.datamodules.poisoned import PoisonedDataModule
from lightning_defense.datamodules.shortcut_squeezing import ShortcutSqueezeDataModule
from lightning_defense.datamodules.wrapper import TrainSplitWrapper

__all__ = [
    "CIFAR10DataModule",
    "DeepKNNFilterDataModule",
    "DiffusionPurifiedDataModule",
    "DigitsDataModule",
    "EclipseDataModule",
    "FashionMNISTDataModule",
    "GaussianNoiseDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "IndexedDataset",
    "PoisonSet",
    "PoisonSetError",
    "PoisonedDataModule",
    "ShortcutSqueezeDataModule",
    "TrainSplitWrapper",
    "UntrustedPickleError",
    "dataset_tensors",
    "from_benchmark_pickles",
    "from_npy",
    "from_poisoned_arrays",
    "load_digits_tensors",
    "per_sample_normal",
    "read_cifar10",
    "unpack_batch",
]

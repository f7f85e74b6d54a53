"""The embedded default data: scikit-learn's 1,797 real 8x8 handwritten digits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_defense.core.batch import IndexedDataset
from lightning_defense.datamodules.base import ImageDataModule, check_split_args, seeded_split


def load_digits_tensors(image_size: int = 32, num_channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as float images in [0, 1], resized to ``image_size`` (bilinear), and labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.clamp_(0.0, 1.0).repeat(1, num_channels, 1, 1)
    return images.contiguous(), torch.as_tensor(bunch.target, dtype=torch.long)


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 8x8 digits (10 classes), resized: the quickstart, demo and test data.

    The split into train / val / test is reproducible from ``seed``.

    Args:
        image_size: Side length after bilinear resizing (32 matches CIFAR-10 models).
        num_channels: 1 (grayscale) or 3 (the gray image repeated, for RGB models).
        val_fraction: Fraction of the 1,797 images held out for validation.
        test_fraction: Fraction held out for testing.
        batch_size, num_workers, seed: see :class:`ImageDataModule`.

    Example::

        dm = DigitsDataModule(image_size=16)
        dm.setup("fit")
        x, y, idx = next(iter(dm.train_dataloader()))
    """

    num_classes = 10

    def __init__(
        self,
        image_size: int = 32,
        num_channels: int = 1,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 (the digits are 8x8); got {image_size}")
        check_split_args(num_channels, val_fraction, test_fraction)
        self.image_size = image_size
        self.num_channels = num_channels
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_digits_tensors(self.image_size, self.num_channels)
        test_idx, val_idx, train_idx = seeded_split(len(images), (self.test_fraction, self.val_fraction), self.seed)
        self.train_set = IndexedDataset(images[train_idx], labels[train_idx])
        self.val_set = IndexedDataset(images[val_idx], labels[val_idx])
        self.test_set = IndexedDataset(images[test_idx], labels[test_idx])

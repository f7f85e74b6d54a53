"""A user's own images, one folder per class."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_defense.datamodules.base import ImageDataModule, check_split_args, seeded_split

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def scan_class_folders(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted folder names) and ``(file, class index)`` pairs under ``root``."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; expected {root}/<class name>/<image files>")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"image folder {root} has no class sub-folders; expected {root}/<class name>/<images>")
    samples = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not samples:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
    return classes, samples


class ImageFileDataset(Dataset):
    """Images read lazily from files, resized to a square; items are ``(image, label, index)``."""

    def __init__(self, samples: list[tuple[Path, int]], image_size: int, num_channels: int) -> None:
        self.samples = samples
        self.image_size = image_size
        self.mode = "L" if num_channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        path, label = self.samples[index]
        with Image.open(path) as image:
            image = image.convert(self.mode).resize((self.image_size, self.image_size), Image.BILINEAR)
            x = pil_to_tensor(image).float().div_(255.0)
        return x, torch.tensor(label), index


class ImageFolderDataModule(ImageDataModule):
    """Reads ``root/<class>/<image>``; images are loaded lazily, so the set may exceed memory.

    Args:
        root: Training images, one sub-folder per class (sorted names give the class indices).
        test_root: Optional separate test folder with the same class folders. Without it, a seeded
            ``test_fraction`` of ``root`` is held out.
        image_size: Images are resized to ``image_size`` x ``image_size``.
        num_channels: 1 (grayscale) or 3 (RGB).
        val_fraction, test_fraction: Seeded hold-out fractions of ``root``.
        batch_size, num_workers, seed: see :class:`ImageDataModule`.
    """

    def __init__(
        self,
        root: str,
        test_root: str | None = None,
        image_size: int = 32,
        num_channels: int = 3,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        check_split_args(num_channels, val_fraction, 0.0 if test_root else test_fraction)
        self.root, self.test_root = Path(root), Path(test_root) if test_root else None
        self.classes, self._samples = scan_class_folders(self.root)
        self.num_classes = len(self.classes)
        self.num_channels = num_channels
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.test_fraction = 0.0 if self.test_root else test_fraction

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        test_idx, val_idx, train_idx = seeded_split(len(self._samples), (self.test_fraction, self.val_fraction), self.seed)
        pick = lambda idx: ImageFileDataset([self._samples[i] for i in idx], self.image_size, self.num_channels)  # noqa: E731
        self.train_set, self.val_set = pick(train_idx), pick(val_idx)
        if self.test_root is None:
            self.test_set = pick(test_idx)
            return
        test_classes, test_samples = scan_class_folders(self.test_root)
        if test_classes != self.classes:
            raise ValueError(f"test_root {self.test_root} has classes {test_classes}, but root has {self.classes}")
        self.test_set = ImageFileDataset(test_samples, self.image_size, self.num_channels)

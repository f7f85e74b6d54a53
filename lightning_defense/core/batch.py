"""The batch contract every defense relies on.

Every datamodule of this package yields batches ``(images, labels, indices)``:

* ``images``: float32 in [0, 1], shaped (N, C, H, W), **not normalised**;
* ``labels``: int64 class indices;
* ``indices``: int64, each sample's index in its split.

The order in which things happen to a training batch is:

1. data-rewriting defenses (purifying datamodule wrappers) act offline, before training;
2. training-time defenses (callbacks such as ``FriendsNoise``) act in ``on_train_batch_start``,
   on the un-normalised batch already on the device, and use ``indices`` for per-sample state;
3. the model's ``training_step`` applies random crop/flip augmentation, then normalisation.

A user's own datamodule need not follow this contract: :mod:`lightning_defense.core.pixels` reads its
``(x, y)`` or dict batches, its normalisation and its dataset-side augmentation, and every defense acts on
them in [0, 1] pixel space through it.
"""

from __future__ import annotations

from typing import Optional

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


def value_range(images: Tensor) -> Optional[tuple[float, float]]:
    """``(min, max)`` of ``images`` with one ``aminmax`` and one device sync; None when empty. Every pixel-range
    check (:func:`require_pixel_range`, :meth:`~lightning_defense.core.pixels.PixelSpace.check`) measures with it."""
    if images.numel() == 0:
        return None
    low, high = torch.stack(torch.aminmax(images.detach().float())).tolist()
    return low, high


def require_pixel_range(images: Tensor, who: str, what: str = "training batch",
                        acts_on: str = "These callbacks act on un-normalised pixels in [0, 1] (and clamp their "
                                       "perturbed images to [0, 1])") -> None:
    """Raise unless ``images`` lie in [0, 1], the batch contract (one ``aminmax`` and one sync).

    Defenses that perturb pixels and clamp the result to [0, 1] (FRIENDS, PGD adversarial training) call it
    first: on normalised images (e.g. in [-1, 1]) that clamp would silently destroy half of every image.

    ``acts_on`` says what the caller does with pixels, for the message.

    Raises:
        ValueError: naming ``who``, the observed range and what would work.
    """
    bounds = value_range(images)
    if bounds is None:
        return
    low, high = bounds
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"{who}: got {what} with values in [{low:.4g}, {high:.4g}], outside [0, 1]. {acts_on}; give it images "
            "in [0, 1] and normalise inside the LightningModule, e.g. ImageClassifier(mean=..., std=...)"
        )

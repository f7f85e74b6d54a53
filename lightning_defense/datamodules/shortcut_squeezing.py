"""Image shortcut squeezing (ISS, Liu et al. 2023): grayscale or JPEG compression of the training set.

ECLIPSE's Table 1 compares against both: they squeeze out the simple, high-frequency or colour-coded
"shortcuts" that unlearnable-example poisons plant.
"""

from __future__ import annotations

from typing import Optional

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_defense.core.batch import IndexedDataset, dataset_tensors, require_pixel_range
from lightning_defense.core.pixels import Normalization
from lightning_defense.datamodules.wrapper import TrainSplitWrapper

ISS_METHODS = ("grayscale", "jpeg")


def grayscale(images: Tensor) -> Tensor:
    """ITU-R 601 luma, repeated over the channels; a 1-channel image is returned unchanged."""
    if images.shape[1] == 1:
        return images.clone()
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True).expand_as(images).contiguous()


ISS_ACTS_ON = "Image shortcut squeezing acts on un-normalised pixels in [0, 1] (8-bit JPEG would clip everything else)"


def jpeg_compress(images: Tensor, quality: int) -> Tensor:
    """Encode every image as JPEG at ``quality`` and decode it again (8-bit round trip).

    Raises:
        ValueError: If ``images`` are not in [0, 1] (8-bit JPEG would clip them).
    """
    from torchvision.io import decode_jpeg, encode_jpeg

    require_pixel_range(images, "jpeg_compress", "images", ISS_ACTS_ON)
    as_uint8 = images.mul(255).round_().to(torch.uint8)
    decoded = decode_jpeg(encode_jpeg(list(as_uint8), quality=quality))
    return torch.stack([d.expand(images.shape[1], -1, -1) for d in decoded]).float().div_(255.0)


class ShortcutSqueezeDataModule(TrainSplitWrapper):
    """``base`` with its training images squeezed by grayscale or JPEG compression.

    Args:
        base: The (possibly poisoned) datamodule.
        method: ``"grayscale"`` or ``"jpeg"``.
        quality: JPEG quality in [1, 100] (ISS uses 10 against l_inf poisons).
        normalization: ``(mean, std)`` of ``base``'s training images, when its transform and attributes do not say
            (see :class:`~lightning_defense.datamodules.wrapper.TrainSplitWrapper`).

    It acts on [0, 1] pixels: a user's normalised images are un-normalised for it and normalised again
    after; pixels outside [0, 1] are a clear error in ``setup``, never a silent clip.

    Example::

        dm = ShortcutSqueezeDataModule(PoisonedDataModule(DigitsDataModule(), "lsp.npz"), method="jpeg")
    """

    def __init__(self, base: L.LightningDataModule, method: str = "jpeg", quality: int = 10,
                 normalization: Optional[Normalization] = None) -> None:
        super().__init__(base, normalization)
        if method not in ISS_METHODS:
            raise ValueError(f"method must be one of {ISS_METHODS}; got {method!r}")
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must be in [1, 100]; got {quality}")
        self.method = method
        self.quality = quality

    def wrap_train(self, train_set: Dataset) -> Dataset:
        images, labels = dataset_tensors(train_set)
        require_pixel_range(images, "ShortcutSqueezeDataModule", f"training images of {type(self.base).__name__}",
                            ISS_ACTS_ON)
        squeezed = grayscale(images) if self.method == "grayscale" else jpeg_compress(images, self.quality)
        return IndexedDataset(squeezed, labels)

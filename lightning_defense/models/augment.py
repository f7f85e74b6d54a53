"""Batched random crop and flip on the device, run after the defenses have acted."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_defense.core import rng

#: Purpose key of the training augmentation's streams (see :func:`augmentation_generator`).
AUGMENT = 0xA06


def augmentation_generator(seed: int, epoch: int, batch: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The crop/flip stream of one training batch, keyed by ``(seed, epoch, batch index, rank)``.

    A function of the key alone: a fit resumed at epoch ``e`` draws what the uninterrupted fit drew there,
    and every DDP rank draws its own.
    """
    return rng.generator(seed, AUGMENT, epoch, batch, rank, device=device)


def random_crop_flip(x: Tensor, padding: int = 4, flip: bool = True, generator: Optional[torch.Generator] = None) -> Tensor:
    """Zero-pad by ``padding``, take a random crop of the original size per sample, and flip half.

    The standard CIFAR augmentation (``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``), done on
    the whole batch at once so it can run after ``on_train_batch_start`` callbacks. The offsets and flips
    are drawn on ``generator``'s device (a CPU generator keeps a keyed stream valid for images on a GPU).
    """
    return apply_crop_flip(x, padding, *draw_crop_flip(len(x), padding, flip, generator, x.device))


def draw_crop_flip(n: int, padding: int, flip: bool, generator: Optional[torch.Generator],
                   device: torch.device) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """The draws of :func:`random_crop_flip` for ``n`` images: row and column offsets and the flip mask, on ``device``."""
    draw_on = generator.device if generator is not None else device
    oy = ox = mask = None
    if padding > 0:
        oy = torch.randint(0, 2 * padding + 1, (n,), device=draw_on, generator=generator).to(device)
        ox = torch.randint(0, 2 * padding + 1, (n,), device=draw_on, generator=generator).to(device)
    if flip:
        mask = (torch.rand(n, device=draw_on, generator=generator) < 0.5).to(device)
    return oy, ox, mask


def apply_crop_flip(x: Tensor, padding: int, oy: Optional[Tensor], ox: Optional[Tensor], mask: Optional[Tensor]) -> Tensor:
    """Crop and flip ``x`` (N, C, H, W) as drawn by :func:`draw_crop_flip` (several draws may be concatenated)."""
    n, _, h, w = x.shape
    device = x.device
    if oy is not None:  # one gather from the flattened padded images (faster than 4-d advanced indexing)
        padded = F.pad(x, (padding,) * 4)
        rows = oy[:, None, None] + torch.arange(h, device=device)[None, :, None]
        cols = ox[:, None, None] + torch.arange(w, device=device)[None, None, :]
        flat = (rows * (w + 2 * padding) + cols).view(n, 1, h * w).expand(n, x.shape[1], h * w)
        x = padded.flatten(2).gather(2, flat).view(n, x.shape[1], h, w)
    if mask is not None:
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x

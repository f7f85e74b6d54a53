"""The Gaussian-only baseline of Hong, Carlini & Kurakin: Gaussian noise on every training image, no denoising.

It is their training-data smoothing with the denoiser replaced by the identity (X = 0 in their Sec. 3);
the certification loop trains one model per noise draw (``seed``). RAB (Weber et al.) also noises the
test input: that is the certification loop's ``rab`` mode, not this wrapper alone.
"""

from __future__ import annotations

from typing import Optional

import lightning as L
import torch
from torch.utils.data import Dataset

from lightning_defense.core.batch import IndexedDataset, dataset_tensors
from lightning_defense.core.pixels import Normalization
from lightning_defense.core.rng import per_sample_normal
from lightning_defense.datamodules.wrapper import TrainSplitWrapper


class GaussianNoiseDataModule(TrainSplitWrapper):
    """``base`` with its training images replaced by ``x + sigma * N(0, I)`` (one fixed draw per ``seed``).

    The noisy images are not clipped: the smoothing certificate assumes the Gaussian is added as is.
    Validation and test data stay untouched.

    Args:
        base: The (possibly poisoned) datamodule.
        sigma: Noise std in [0, 1] pixel units.
        seed: The noise draw; model i of a certification run uses draw i.
        normalization: ``(mean, std)`` of ``base``'s training images, when its transform and attributes do not say
            (see :class:`~lightning_defense.datamodules.wrapper.TrainSplitWrapper`).

    Example::

        dm = GaussianNoiseDataModule(DigitsDataModule(), sigma=0.25, seed=0)
    """

    def __init__(self, base: L.LightningDataModule, sigma: float = 0.25, seed: int = 0,
                 normalization: Optional[Normalization] = None) -> None:
        super().__init__(base, normalization)
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0 (noise std in [0,1] pixel units); got {sigma}")
        self.sigma = float(sigma)
        self.seed = int(seed)

    @property
    def certified_sigma(self) -> float:
        """The smoothing noise it certifies: ``sigma``, the std of the Gaussian on every training sample."""
        return self.sigma

    def wrap_train(self, train_set: Dataset) -> Dataset:
        images, labels = dataset_tensors(train_set)
        noise = per_sample_normal(self.seed, torch.arange(len(images)), tuple(images.shape[1:]))
        return IndexedDataset(images + self.sigma * noise, labels)

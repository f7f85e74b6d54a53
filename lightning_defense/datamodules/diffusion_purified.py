"""Diffusion-denoising purification of a training split (Hong, Carlini & Kurakin), cached offline.

Every training image gets Gaussian noise of std ``sigma`` ([0, 1] pixel units) and is denoised by a DDPM
in one step (or a reverse process of ``steps`` model calls); a classifier then trains on the result.
One noise draw (``seed``) is one purified set; the certification loop trains one model per seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset

from lightning_defense.core.batch import dataset_tensors
from lightning_defense.core.collective import Collective
from lightning_defense.core.device import autocast, check_device, check_precision, resolve_device
from lightning_defense.core.pixels import Normalization
from lightning_defense.core.store import (
    STORAGE_DTYPES,
    CachedImageDataset,
    ChunkCache,
    fill_cache,
    fingerprint,
    to_storage,
)
from lightning_defense.datamodules.wrapper import TrainSplitWrapper
from lightning_defense.diffusion.denoise import (
    noise_and_denoise,
    sigma_at_timestep,
    timestep_for_sigma,
    warn_no_purification,
)
from lightning_defense.diffusion.denoiser import Denoiser, load_denoiser

#: Bump when a change to the purification code changes its output: old caches are then not reused.
CODE_VERSION = "diffusion-purify-1"


class DiffusionPurifiedDataModule(TrainSplitWrapper):
    """``base`` with its training split noised and denoised by a DDPM, once, offline; val/test untouched.

    Pseudocode 1 of Hong et al.: t* = GETTIMESTEP(sigma); each training image x becomes
    ``x0_hat(sqrt(abar_t*) * (2x - 1 + 2 * sigma * eps))`` in [0, 1], with eps keyed by
    ``(seed, sample index)``. The result is cached under a key made from the training images, the
    denoiser's weights and schedule, sigma, t*, seed, steps, the storage format and the code version:
    a finished cache is reused once every chunk matches its SHA-256 (a damaged chunk is recomputed, never
    used), an interrupted one resumes, and under DDP the chunks are shared out over the ranks (rank 0 writes).

    Args:
        base: The (possibly poisoned) datamodule to purify.
        denoiser: A diffusers-format directory or hub id (:func:`load_denoiser`), or a :class:`Denoiser`.
        sigma: Noise std in [0, 1] pixel units (the paper uses 0.1, 0.25, 0.5, 1.0). Leave None and give
            ``timestep`` to start from a fixed timestep instead (ECLIPSE's t* = 100).
        seed: The noise draw; model i of a certification run uses seed i.
        steps: Denoiser calls: 1 = single-step denoising (the paper), more = reverse process from t*.
        timestep: Start at this timestep instead of deriving it from ``sigma``.
        batch_size: Images per denoiser call (the training loader keeps ``base``'s batch size).
        chunk_size: Images per cache file (a multiple of ``batch_size`` keeps batches whole).
        cache_dir: Root directory of the caches.
        storage: ``uint8`` (4x smaller, 1/255 rounding) or ``float16``.
        device: ``auto`` (this rank's GPU if there is one, else CPU), ``cpu`` or ``cuda[:i]``.
        precision: ``"32"``, or ``"bf16"``: the denoiser's forward passes under bfloat16 autocast on a GPU (about
            3 significant digits; the result is stored as uint8 or float16 anyway). Part of the cache key.
        progress: Show a progress bar (rank 0).
        normalization: ``(mean, std)`` of ``base``'s training images, when its transform and attributes do not say
            (see :class:`~lightning_defense.datamodules.wrapper.TrainSplitWrapper`).

    Raises:
        ValueError: sigma/timestep/steps/batch_size/storage out of range.

    Example::

        dm = DiffusionPurifiedDataModule(DigitsDataModule(), "lightning_defense/assets/digits_ddpm", sigma=0.25)
        dm.prepare_data(); dm.setup("fit")
    """

    #: Every DDP rank must call ``setup`` together: the ranks share the purification.
    collective_setup = True

    def __init__(
        self,
        base: L.LightningDataModule,
        denoiser: Union[str, Denoiser] = "google/ddpm-cifar10-32",
        sigma: Optional[float] = 0.25,
        seed: int = 0,
        steps: int = 1,
        timestep: Optional[int] = None,
        batch_size: int = 256,
        chunk_size: int = 4096,
        cache_dir: str = "runs/cache/purified",
        storage: str = "uint8",
        device: str = "auto",
        precision: str = "32",
        progress: bool = True,
        normalization: Optional[Normalization] = None,
    ) -> None:
        super().__init__(base, normalization)
        if (sigma is None) == (timestep is None):
            raise ValueError(f"give exactly one of sigma and timestep; got sigma={sigma}, timestep={timestep}")
        if sigma is not None and not sigma > 0:
            raise ValueError(f"sigma must be > 0 (noise std in [0,1] pixel units); got {sigma}")
        if timestep is not None and timestep < 0:
            raise ValueError(f"timestep must be >= 0; got {timestep}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1 (1 = single-step denoising); got {steps}")
        check_purification_args(batch_size, chunk_size, storage, device)
        self.denoiser_source = denoiser
        self.sigma = None if sigma is None else float(sigma)
        self.seed = int(seed)
        self.steps = int(steps)
        self.timestep = timestep
        self.purify_batch_size = int(batch_size)
        self.chunk_size = int(chunk_size)
        self.cache_dir = Path(cache_dir)
        self.storage = storage
        self.device = device
        self.precision = check_precision(precision)
        self.progress = progress
        self.cache: Optional[ChunkCache] = None
        self._purified_from: Optional[tuple] = None  # (labels, per-image sums) of the set that was purified
        self._denoiser: Optional[Denoiser] = None

    # -- Lightning hooks ---------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Purify in this process when not distributed; under DDP the ranks share the work in setup()."""
        super().prepare_data()
        if not self.collective().is_distributed:
            self.purify()

    def setup(self, stage: Optional[str] = None) -> None:
        self.base.setup(stage)
        if self.train_set is None and self.cache is None and self.builds_train(stage):
            self.purify()  # not again when prepare_data (in this process) made sure of the cache
        super().setup(stage)

    def wrap_train(self, train_set: Dataset) -> Dataset:
        images, labels = dataset_tensors(train_set)
        if self._purified_from is not None and not _same_samples(self._purified_from, (images, labels)):
            raise ValueError(
                f"{type(self.base).__name__} gave another training set in setup() than the one that was purified "
                "(other images or labels in some positions): its setup() is not deterministic, e.g. random_split "
                "without generator=torch.Generator().manual_seed(...). Purified images would be paired with the "
                "wrong labels; seed the split so every setup() builds the same one"
            )
        return CachedImageDataset(self.cache.load(), labels)

    @property
    def certified_sigma(self) -> float:
        """The smoothing noise it certifies: ``sigma``, or with a fixed ``timestep`` the pixel-space sigma of
        that timestep (:func:`sigma_at_timestep` of the denoiser's schedule, which loads the denoiser).

        Every training sample gets exactly this Gaussian before denoising (``x + sigma * eps`` rescaled to
        t*); the denoising counts as the learner (Hong et al.).
        """
        if self.sigma is not None:
            return self.sigma
        return sigma_at_timestep(self.get_denoiser().alphas_cumprod, int(self.timestep))

    # -- the purification job ----------------------------------------------------------------------
    def get_denoiser(self) -> Denoiser:
        """The denoiser, loaded once."""
        if self._denoiser is None:
            self._denoiser = load_denoiser(self.denoiser_source)
        return self._denoiser

    def purify(self) -> ChunkCache:
        """Make sure the cache for the current inputs exists and is intact (compute what is missing or
        damaged); return it.

        Global rank 0 looks at the disk (the manifest, and every chunk against its SHA-256) and every rank
        follows its decision, so all of them enter :func:`fill_cache` together or none does.
        """
        images = self._train_images()
        cache = self.cache_for(images)
        collective = self.collective()
        intact = None
        if collective.rank == 0 or not collective.is_distributed:
            intact = cache.is_complete() and not cache.damaged()
        if not collective.broadcast(intact, src=0):
            device = self._device()
            model = self.get_denoiser().to(device)
            t_star, sigma = cache.meta["t_star"], cache.meta["sigma"]
            rank_zero_info(f"purifying {len(images)} training images into {cache.directory} on {device}")

            def compute(start: int, stop: int) -> np.ndarray:
                return self.purify_range(model, images, start, stop, t_star, sigma, device)

            fill_cache(cache, compute, desc=f"diffusion denoising sigma={sigma:g} seed={self.seed}",
                       progress=self.progress, collective=collective)
        self.cache = cache
        return cache

    def cache_for(self, images: Optional[torch.Tensor] = None) -> ChunkCache:
        """The cache of these training images (default: ``base``'s) under the current settings; computes nothing.

        Its key hashes the code version, the images, the denoiser's weights and schedule, sigma, t*, the
        seed, the number of steps, the storage format and the chunk size.
        """
        images = self._train_images() if images is None else images
        denoiser = self.get_denoiser()
        self._check_images(images, denoiser)
        t_star, sigma = self.noise_level(denoiser)
        key = fingerprint(
            CODE_VERSION, images, denoiser.fingerprint(), sigma, t_star, self.seed, self.steps,
            self.storage, self.chunk_size, *(() if self.precision == "32" else (self.precision,)),
        )
        meta = {
            "code_version": CODE_VERSION, "denoiser": str(denoiser.source), "sigma": sigma, "t_star": t_star,
            "seed": self.seed, "steps": self.steps, "key": key,
        }
        return ChunkCache(
            self.cache_dir / f"diffusion-{key[:20]}", len(images), tuple(images.shape[1:]), self.storage,
            self.chunk_size, meta,
        )

    def _train_images(self) -> torch.Tensor:
        """``base``'s training images as [0, 1] pixels (a user's datamodule read through its pixel view)."""
        self.base.setup("fit")
        view, triples = self.train_pixels()
        images, labels = dataset_tensors(triples)
        view.space.check(images, type(self).__name__, f"{type(self.base).__name__} training set")
        self._purified_from = _signature(images, labels)
        return images

    def purify_range(self, model: Denoiser, images, start: int, stop: int, t_star: int, sigma: float, device) -> np.ndarray:
        """Purify samples ``[start, stop)`` batch by batch, under inference mode; return their stored form."""
        out = []
        with torch.inference_mode(), autocast(torch.device(device), self.precision):
            for first in range(start, stop, self.purify_batch_size):
                last = min(first + self.purify_batch_size, stop)
                batch = images[first:last].to(device, non_blocking=True)
                purified = noise_and_denoise(
                    model, batch, torch.arange(first, last), model.alphas_cumprod, t_star, sigma,
                    self.seed, self.steps, model.variance_type,
                )
                out.append(to_storage(purified, self.storage))
        return np.concatenate(out)

    def noise_level(self, denoiser: Denoiser) -> tuple[int, float]:
        """``(t*, sigma)``: from ``sigma`` by GETTIMESTEP, or from a fixed ``timestep``."""
        if self.timestep is not None:
            sigma = sigma_at_timestep(denoiser.alphas_cumprod, int(self.timestep))
            if self.timestep == 0:
                warn_no_purification(sigma, sigma)
            return int(self.timestep), sigma
        return timestep_for_sigma(denoiser.alphas_cumprod, self.sigma), self.sigma

    def _check_images(self, images: torch.Tensor, denoiser: Denoiser) -> None:
        """The denoiser's channels and size (the [0, 1] range is checked as the pixels are read)."""
        if images.shape[1] != denoiser.in_channels:
            raise ValueError(
                f"the denoiser {denoiser.source} takes {denoiser.in_channels}-channel images; the training "
                f"images have {images.shape[1]} channels (e.g. set num_channels={denoiser.in_channels})"
            )
        size = denoiser.sample_size
        if size is not None and tuple(images.shape[2:]) != (size, size):
            raise ValueError(
                f"the denoiser {denoiser.source} was trained on {size}x{size} images; the training images are "
                f"{images.shape[2]}x{images.shape[3]} (e.g. set image_size={size})"
            )

    def _device(self) -> torch.device:
        return resolve_device(self.device, self.collective(), stage="diffusion.purify")


def _signature(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return labels.clone(), images.double().flatten(1).sum(dim=1)


def _same_samples(signature: tuple, samples: tuple) -> bool:
    labels, sums = signature
    other_labels, other_sums = _signature(*samples)
    return torch.equal(labels, other_labels) and torch.allclose(sums, other_sums, rtol=0, atol=1e-6)


def check_purification_args(batch_size: int, chunk_size: int, storage: str, device: str) -> None:
    """The checks of the purification job's settings (also run by wrappers that build the job later)."""
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1; got {batch_size}, {chunk_size}")
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"storage must be one of {sorted(STORAGE_DTYPES)}; got {storage!r}")
    check_device(device)

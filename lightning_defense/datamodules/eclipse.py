"""ECLIPSE (Wang et al., "Expunging Clean-label Indiscriminate Poisons via Sparse Diffusion Purification").

Algorithm 1 of the paper, as a wrapper of the user's (possibly poisoned) datamodule:

1. **Sparse clean set** D_s: user indices into ``base``'s held-out validation split, a separate clean
   datamodule, or by default a seeded random B = ``clean_fraction`` * N of the validation split. D_s never
   shares an image with ``base``'s test split: a validation split that is the test split, or a D_s holding
   a test image (by content fingerprint), is refused, since the diffusion model would learn test images.
2. **Replication**: D_A = D_s plus M copies of it, i.e. ``(M + 1) * |D_s|`` items (lines 1-4: D_A starts as
   D_s and M unions follow).
3. **Sparse diffusion training** from scratch on D_A: improved-DDPM UNet, cosine schedule, learned-range
   variance, hybrid loss, cached by content and verified on reuse
   (:class:`~lightning_defense.diffusion.sparse.SparseDenoiserBuilder` does 2 and 3).
4. **Purification** (module A): ``x_t* = sqrt(abar_t*) x + sqrt(1 - abar_t*) eps``, then t* ancestral steps
   t = t*..1 with the learned variance, clipping x0. This is an ordinary :class:`DiffusionPurifiedDataModule`
   given the built denoiser and a fixed timestep: its cache, resume and DDP sharding, and its per-index
   noise, so purified image i is training sample i (the public code shuffles and loses that mapping).
5. **Compensation**, fresh every training batch: random grayscale with probability p (module B), then
   Gaussian noise of std sigma in [0, 1] pixels, clamped (module C). Grayscale does nothing on 1-channel
   data, which is already gray.

The timesteps here are 0-based (diffusers): the paper's t* = 100 (steps t = 100..1) is noise level
``abar[t* - 1]`` followed by t* model calls at timesteps t*-1..0.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_defense.core.device import resolve_device
from lightning_defense.core.pixels import Normalization, PixelView
from lightning_defense.core.store import ChunkCache, fingerprint
from lightning_defense.datamodules.diffusion_purified import (
    DiffusionPurifiedDataModule,
    check_purification_args,
)
from lightning_defense.datamodules.wrapper import TrainSplitWrapper, split_dataset
from lightning_defense.diffusion.denoise import sigma_at_timestep
from lightning_defense.diffusion.denoiser import Denoiser
from lightning_defense.diffusion.sparse import SparseDenoiserBuilder, replicate

__all__ = ["EclipseDataModule", "compensate", "replicate"]

#: ITU-R 601-2 luma, as ``torchvision.transforms.functional.rgb_to_grayscale``.
LUMA = (0.299, 0.587, 0.114)


def compensate(
    images: Tensor, grayscale_p: float = 0.4, noise_std: float = 0.05, generator: Optional[torch.Generator] = None
) -> Tensor:
    """The corruption compensation C(x; p, sigma): grayscale with probability p, then ``+ N(0, sigma^2)``, clamped.

    Random draws come from ``generator`` on the CPU (so a seed gives the same result on any device).
    Grayscale on 1-channel images is the identity.

    Args:
        images: (N, C, H, W) in [0, 1].
        grayscale_p: p, the per-image probability of grayscale (module B); 0 disables it.
        noise_std: sigma in [0, 1] pixel units (module C); 0 disables it.
        generator: A CPU ``torch.Generator``.
    """
    n = images.shape[0]
    gray = torch.rand(n, generator=generator) < grayscale_p
    if images.shape[1] == 3 and bool(gray.any()):
        luma = torch.tensor(LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        y = (images * luma).sum(dim=1, keepdim=True).expand_as(images)
        images = torch.where(gray.to(images.device).view(-1, 1, 1, 1), y, images)
    if noise_std > 0:
        noise = torch.randn(images.shape, generator=generator).to(images)
        images = (images + noise_std * noise).clamp(0.0, 1.0)
    return images


class EclipseDataModule(TrainSplitWrapper):
    """ECLIPSE's purified training split: sparse-set diffusion purification from t*, plus compensation.

    ``base``'s training split is purified once, offline (cached, resumable, DDP-sharded by an ordinary
    :class:`DiffusionPurifiedDataModule`) by a DDPM trained once on the replicated sparse clean set (kept
    by content by :class:`~lightning_defense.diffusion.sparse.SparseDenoiserBuilder`); during training every batch gets fresh compensation,
    :meth:`train_batch_transform` (before callbacks and the model's crop/flip; the certification loop applies
    it too); validation and test pass through untouched. As a smoothing wrapper of the certification loop it
    certifies the sigma of its t* noise level (:attr:`certified_sigma`, about 0.025 at the paper's t* = 100
    of 4000 steps).

    The paper's ablations (Table 4): ``diffusion=False`` drops module A (B+C), ``grayscale_p=0`` drops B,
    ``noise_std=0`` drops C.

    Compensation runs before the model's own random crop/flip (the public code crops and flips first;
    grayscale and flips commute, and only the crop's zero padding escapes the noise). Under DDP global
    rank 0 trains the diffusion model while the others wait at a barrier, so train it beforehand with
    one process (``lightning-defense purify --config cfg.yaml`` trains and purifies) when it takes longer
    than the process group's timeout.

    Args:
        base: The (possibly poisoned) datamodule whose training split is purified.
        clean_subset: D_s: None (a seeded random sample of ``base``'s validation split), a list of indices
            into that validation split, or a clean datamodule whose training split is D_s.
        clean_fraction: B/N, the size of the default D_s relative to the training split (paper: 4%).
        clean_size: B directly (overrides ``clean_fraction``; the public code uses 2000 for CIFAR-10).
        replication: M; D_A has ``(M + 1) * B`` items.
        t_star: The forward step t* (paper: 100 of 4000); t* reverse steps follow.
        diffusion: Module A; False trains and purifies nothing (the B+C ablation).
        grayscale_p: p of the random grayscale (module B; 0 disables).
        noise_std: sigma of the compensation noise in [0, 1] pixels (module C; 0 disables).
        num_train_timesteps: T of the cosine schedule.
        block_out_channels: UNet channels per resolution.
        layers_per_block: Res blocks per resolution.
        attention_resolutions: Resolutions with self-attention.
        num_heads: Attention heads.
        dropout: UNet dropout.
        train_steps: I, diffusion training iterations.
        train_batch_size: Diffusion training batch size.
        lr: AdamW learning rate of the diffusion training.
        ema_decay: EMA of the diffusion weights (the EMA model purifies).
        model_dir: Where trained diffusion models are kept (one directory per content key).
        seed: Seed of D_s, of the diffusion training, of the purification noise and of the compensation.
        batch_size: Images per denoiser call during purification.
        chunk_size: Images per purification cache file.
        cache_dir: Root of the purification caches.
        storage: ``uint8`` or ``float16``.
        device: ``auto``, ``cpu`` or ``cuda[:i]`` for diffusion training and purification.
        progress: Progress bars (rank 0).
        normalization: ``(mean, std)`` of ``base``'s training images, when its transform and attributes do not say
            (see :class:`~lightning_defense.datamodules.wrapper.TrainSplitWrapper`).

    Raises:
        ValueError: an argument out of range, D_s larger than the validation split, or D_s overlapping
            ``base``'s test split (its validation split is its test split, or a D_s image is a test image).
        TypeError: ``clean_subset`` is neither None, a list of indices nor a datamodule.

    Example::

        dm = EclipseDataModule(DigitsDataModule(image_size=16, num_channels=3), t_star=25,
                               num_train_timesteps=1000, block_out_channels=(32, 64), train_steps=300)
        dm.prepare_data(); dm.setup("fit")
    """

    #: Every DDP rank must call ``setup`` together: rank 0 trains the model, the ranks share the purification.
    collective_setup = True

    def __init__(
        self,
        base: L.LightningDataModule,
        clean_subset: Union[None, list[int], L.LightningDataModule] = None,
        clean_fraction: float = 0.04,
        clean_size: Optional[int] = None,
        replication: int = 4,
        t_star: int = 100,
        diffusion: bool = True,
        grayscale_p: float = 0.4,
        noise_std: float = 0.05,
        num_train_timesteps: int = 4000,
        block_out_channels: Sequence[int] = (128, 256, 256, 256),
        layers_per_block: int = 3,
        attention_resolutions: Sequence[int] = (16, 8),
        num_heads: int = 4,
        dropout: float = 0.0,
        train_steps: int = 250_000,
        train_batch_size: int = 128,
        lr: float = 1e-4,
        ema_decay: float = 0.9999,
        model_dir: str = "runs/cache/eclipse_ddpm",
        seed: int = 0,
        batch_size: int = 256,
        chunk_size: int = 4096,
        cache_dir: str = "runs/cache/purified",
        storage: str = "uint8",
        device: str = "auto",
        progress: bool = True,
        normalization: Optional[Normalization] = None,
    ) -> None:
        if not 0.0 < clean_fraction <= 1.0:
            raise ValueError(f"clean_fraction (B/N) must be in (0, 1]; got {clean_fraction} (the paper uses 0.04)")
        if clean_size is not None and clean_size < 1:
            raise ValueError(f"clean_size (B) must be >= 1 or None; got {clean_size}")
        if t_star < 1 or t_star > num_train_timesteps:
            raise ValueError(f"t_star must be in [1, num_train_timesteps={num_train_timesteps}]; got {t_star}")
        if not 0.0 <= grayscale_p <= 1.0:
            raise ValueError(f"grayscale_p must be in [0, 1]; got {grayscale_p} (the paper uses 0.4)")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0 ([0,1] pixel units); got {noise_std} (the paper uses 0.05)")
        if clean_subset is not None and not isinstance(clean_subset, (list, tuple, L.LightningDataModule)):
            raise TypeError(
                f"clean_subset must be None, a list of validation-split indices or a LightningDataModule; "
                f"got {type(clean_subset).__name__}"
            )
        check_purification_args(batch_size, chunk_size, storage, device)
        super().__init__(base, normalization)
        self.clean_subset = list(clean_subset) if isinstance(clean_subset, (list, tuple)) else clean_subset
        self.clean_fraction = float(clean_fraction)
        self.clean_size = clean_size
        self.t_star = int(t_star)
        self.diffusion = bool(diffusion)
        self.grayscale_p = float(grayscale_p)
        self.noise_std = float(noise_std)
        self.seed = int(seed)
        self.purify_batch_size = int(batch_size)
        self.chunk_size = int(chunk_size)
        self.cache_dir = cache_dir
        self.storage = storage
        self.device = device
        self.progress = progress
        self.builder = SparseDenoiserBuilder(
            model_dir, replication=replication, num_train_timesteps=num_train_timesteps,
            block_out_channels=block_out_channels, layers_per_block=layers_per_block,
            attention_resolutions=attention_resolutions, num_heads=num_heads, dropout=dropout,
            train_steps=train_steps, train_batch_size=train_batch_size, lr=lr, ema_decay=ema_decay, seed=seed,
            progress=progress,
        )
        self._denoiser: Optional[Denoiser] = None
        self._purifier: Optional[DiffusionPurifiedDataModule] = None

    # -- Lightning hooks ---------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Train and purify in this process when not distributed; under DDP the ranks do it in setup()."""
        super().prepare_data()
        if self.diffusion and not self.collective().is_distributed:
            self.purify()

    def setup(self, stage: Optional[str] = None) -> None:
        self.base.setup(stage)
        if self.diffusion and self.train_set is None and self.cache is None and self.builds_train(stage):
            self.purify()  # not again when prepare_data (in this process) made sure of the cache
        super().setup(stage)

    def wrap_train(self, train_set: Dataset) -> Dataset:
        return self.purifier().wrap_train(train_set) if self.diffusion else train_set

    def train_batch_transform(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Module B+C, fresh on every training batch: :func:`compensate` with ``grayscale_p`` and ``noise_std``.

        During ``fit`` its draws come from :meth:`train_batch_generator`; the certification loop gives each
        model its own keyed stream, so its models train as ``fit`` trains them.
        """
        if self.grayscale_p == 0 and self.noise_std == 0:
            return images
        return compensate(images, self.grayscale_p, self.noise_std, generator)

    def train_batch_generator(self, epoch: int, step: int, rank: int = 0, call: int = 0) -> torch.Generator:
        """The CPU generator of one ``fit`` batch's compensation, keyed by (seed, epoch, global step, rank, call).

        Seeded from a fingerprint of its key (not :mod:`lightning_defense.core.rng`): these are the draws of
        the published ECLIPSE results, kept so that those results reproduce.
        """
        key = fingerprint("eclipse-compensation", self.seed, epoch, step, rank, call)
        return torch.Generator().manual_seed(int(key[:15], 16))

    @property
    def certified_sigma(self) -> Optional[float]:
        """The pixel-space sigma of the t* noise level, ``sqrt((1 - abar) / abar) / 2`` at timestep t* - 1.

        Purification starts from ``x_t* = sqrt(abar) x + sqrt(1 - abar) eps``, i.e. ``x + sigma * eps`` in
        [0, 1] pixels rescaled, with that sigma on every training sample; denoising and compensation come
        after it and count as the learner. Read from the cosine schedule of ``num_train_timesteps`` steps
        (the trained model's), so nothing is trained. None with ``diffusion=False``: the clamped
        compensation noise alone is not a Gaussian of known std, so nothing is certified.
        """
        if not self.diffusion:
            return None
        from diffusers import DDPMScheduler  # diffusers is slow to import; only needed here

        kwargs = self.builder.model_kwargs
        schedule = DDPMScheduler(num_train_timesteps=kwargs["num_train_timesteps"], beta_schedule=kwargs["beta_schedule"])
        return sigma_at_timestep(schedule.alphas_cumprod, self.t_star - 1)

    # -- Algorithm 1: the sparse set, the denoiser, the purification ----------------------------------
    def pixels(self, dataset: Dataset, owner: L.LightningDataModule, what: str) -> Tensor:
        """The images of one of the datamodule ``owner``'s splits as [0, 1] pixels (through its
        :class:`~lightning_defense.core.pixels.PixelView`: a user's layout and normalisation are read, the
        range is checked)."""
        normalization = self._normalization if owner is self.base else None
        view = PixelView(dataset, normalization, owner=owner)
        return view.tensors(f"EclipseDataModule ({what} of {type(owner).__name__})")[0]

    def sparse_set(self) -> Tensor:
        """D_s as [0, 1] images (user indices or datamodule, else a seeded sample of the validation split).

        Raises:
            ValueError: D_s would share images with ``base``'s test split.
        """
        self.base.setup("fit")
        base_name = type(self.base).__name__
        test_set = split_dataset(self.base, "test")
        if test_set is None:
            raise AttributeError(
                f"{base_name} has no test split after setup('fit'); ECLIPSE checks its sparse clean set against the "
                "test split, so the wrapped datamodule must set a test_set in setup() or define test_dataloader()"
            )
        train_set = split_dataset(self.base, "train")
        if isinstance(self.clean_subset, L.LightningDataModule):
            self.clean_subset.setup("fit")
            images = self.pixels(split_dataset(self.clean_subset, "train"), self.clean_subset, "the training split")
            expected = tuple(self.train_pixels()[1][0][0].shape)
            if tuple(images.shape[1:]) != expected:
                raise ValueError(
                    f"clean_subset {type(self.clean_subset).__name__}'s images are shaped {tuple(images.shape[1:])}; "
                    f"the training images of {base_name} are {expected}: match image_size/num_channels"
                )
            self.check_disjoint_from_test(images, test_set, f"the training split of {type(self.clean_subset).__name__}")
            return images
        held_out = split_dataset(self.base, "val")
        if held_out is None or len(held_out) == 0:
            raise ValueError(
                f"{base_name} has no validation split to draw the sparse clean set D_s from; give "
                "it one (e.g. val_fraction) or pass clean_subset=<a clean datamodule>"
            )
        if held_out is test_set:
            raise ValueError(
                f"{base_name}'s validation split is its test split (e.g. CIFAR10DataModule(val_fraction=0)), so "
                "ECLIPSE would train its diffusion model on test images and contaminate the test accuracy; hold out "
                "a validation split from the training data (CIFAR10DataModule's default val_fraction=0.1, "
                "DigitsDataModule / ImageFolderDataModule val_fraction > 0) or pass clean_subset=<a clean datamodule>"
            )
        available = len(held_out)
        if self.clean_subset is not None:
            indices = torch.tensor(self.clean_subset, dtype=torch.long)
            if len(indices) == 0 or int(indices.min()) < 0 or int(indices.max()) >= available:
                raise ValueError(
                    f"clean_subset indices must be non-empty and in [0, {available}) (the validation split of "
                    f"{base_name}); got {len(indices)} indices in "
                    f"[{int(indices.min()) if len(indices) else '-'}, {int(indices.max()) if len(indices) else '-'}]"
                )
        else:
            size = self.clean_size or max(1, round(self.clean_fraction * len(train_set)))
            if size > available:
                raise ValueError(
                    f"the sparse set needs {size} images (clean_size / clean_fraction={self.clean_fraction} of "
                    f"{len(train_set)}) but the validation split has {available}; enlarge it or lower them"
                )
            # the published draw of D_s (a torch generator seeded with ``seed``), kept so that results reproduce
            generator = torch.Generator().manual_seed(self.seed)
            indices = torch.randperm(available, generator=generator)[:size].sort().values
        images = self.pixels(held_out, self.base, "the validation split")[indices]
        self.check_disjoint_from_test(images, test_set, f"the validation split of {base_name}")
        return images

    def check_disjoint_from_test(self, images: Tensor, test_set: Dataset, source: str) -> None:
        """Refuse a D_s holding any image of ``base``'s test split, compared by content (one fingerprint per image).

        Raises:
            ValueError: naming how many D_s images are test images and what to use instead.
        """
        test_keys = {fingerprint(image.float()) for image in self.pixels(test_set, self.base, "the test split")}
        shared = [i for i, image in enumerate(images) if fingerprint(image.float()) in test_keys]
        if shared:
            raise ValueError(
                f"{len(shared)} of the {len(images)} sparse-set images D_s (from {source}; positions "
                f"{shared[:5]}{'...' if len(shared) > 5 else ''}) are images of {type(self.base).__name__}'s test "
                "split: ECLIPSE would train its diffusion model on test images and contaminate the test accuracy. "
                "Draw D_s from data disjoint from the test split: a validation split held out from the training "
                "data (e.g. CIFAR10DataModule's default val_fraction=0.1), clean_subset indices of images not in "
                "the test split, or a clean datamodule whose training split holds no test image"
            )

    def augmented_set(self) -> Tensor:
        """D_A: D_s with M copies, ``(M + 1) * |D_s|`` images."""
        return self.builder.augment(self.sparse_set())

    def get_denoiser(self) -> Denoiser:
        """The sparse-set diffusion model, built once (kept in ``model_dir``, or trained there first by rank 0)."""
        if self._denoiser is None:
            collective = self.collective()
            self._denoiser = self.builder.build(self.sparse_set(), collective, resolve_device(self.device, collective, stage="eclipse.train_diffusion"))
        return self._denoiser

    def purifier(self) -> DiffusionPurifiedDataModule:
        """Module A: ``base`` purified by the sparse-set denoiser from timestep t* - 1 in t* steps."""
        if self._purifier is None:
            self._purifier = DiffusionPurifiedDataModule(
                self.base, denoiser=self.get_denoiser(), sigma=None, timestep=self.t_star - 1, steps=self.t_star,
                seed=self.seed, batch_size=self.purify_batch_size, chunk_size=self.chunk_size,
                cache_dir=self.cache_dir, storage=self.storage, device=self.device, progress=self.progress,
                normalization=self._normalization,
            )
        self._purifier.use_collective(self.collective())
        return self._purifier

    def purify(self) -> ChunkCache:
        """Train (or reuse) the denoiser and make sure the purified training split is cached; return the cache.

        Raises:
            ValueError: ``diffusion=False`` (the B+C ablation), which purifies nothing.
        """
        if not self.diffusion:
            raise ValueError("diffusion=False (the B+C ablation) trains and purifies nothing; there is no cache")
        return self.purifier().purify()

    @property
    def cache(self) -> Optional[ChunkCache]:
        """The purification cache once :meth:`purify` ran, else None."""
        return self._purifier.cache if self._purifier is not None else None

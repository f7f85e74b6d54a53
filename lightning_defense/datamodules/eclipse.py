"""ECLIPSE (Wang et al., "Expunging Clean-label Indiscriminate Poisons via Sparse Diffusion Purification").

Algorithm 1 of the paper, as a wrapper of the user's (possibly poisoned) datamodule:

1. **Sparse clean set** D_s: user indices into ``base``'s held-out validation split, a separate clean
   datamodule, or by default a seeded random B = ``clean_fraction`` * N of the validation split (never test).
2. **Replication**: D_A = D_s plus M copies of it, i.e. ``(M + 1) * |D_s|`` items (lines 1-4: D_A starts as
   D_s and M unions follow).
3. **Sparse diffusion training** from scratch on D_A: improved-DDPM UNet, cosine schedule, learned-range
   variance, hybrid loss (:class:`~lightning_defense.diffusion.DiffusionModel`'s loss), cached by content.
4. **Purification** (module A): ``x_t* = sqrt(abar_t*) x + sqrt(1 - abar_t*) eps``, then t* ancestral steps
   t = t*..1 with the learned variance, clipping x0. This is :class:`DiffusionPurifiedDataModule` with a
   fixed timestep: its cache, resume and DDP sharding, and its per-index noise, so purified image i is
   training sample i (the public code shuffles and loses that mapping).
5. **Compensation**, fresh every training batch: random grayscale with probability p (module B), then
   Gaussian noise of std sigma in [0, 1] pixels, clamped (module C). Grayscale does nothing on 1-channel
   data, which is already gray.

The timesteps here are 0-based (diffusers): the paper's t* = 100 (steps t = 100..1) is noise level
``abar[t* - 1]`` followed by t* model calls at timesteps t*-1..0.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional, Sequence, Union

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_defense.core.batch import dataset_tensors
from lightning_defense.core.store import fingerprint
from lightning_defense.datamodules.diffusion_purified import DiffusionPurifiedDataModule
from lightning_defense.datamodules.wrapper import TrainSplitWrapper
from lightning_defense.diffusion.denoiser import Denoiser, load_denoiser
from lightning_defense.diffusion.training import DiffusionModel

#: Bump when a change to the diffusion training code changes the trained model: old models are not reused.
TRAIN_CODE_VERSION = "eclipse-ddpm-1"
#: ITU-R 601-2 luma, as ``torchvision.transforms.functional.rgb_to_grayscale``.
LUMA = (0.299, 0.587, 0.114)


def replicate(sparse_set: Tensor, replication: int) -> Tensor:
    """D_A = D_s together with M copies of it (Algorithm 1, lines 1-4): ``(M + 1) * len(D_s)`` images."""
    if replication < 0:
        raise ValueError(f"replication (M) must be >= 0; got {replication}")
    return sparse_set.repeat(replication + 1, *([1] * (sparse_set.dim() - 1)))


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


class EclipseUNetModel(DiffusionModel):
    """:class:`DiffusionModel` with improved-DDPM attention: at the given resolutions, with ``num_heads`` heads.

    The paper's CIFAR-10 model: channels 128 x (1, 2, 2, 2), 3 res blocks, attention at 16 and 8, 4 heads.
    The heads are counted at the first attention level (diffusers sets a head dimension).
    """

    def __init__(self, attention_resolutions: Sequence[int] = (16, 8), num_heads: int = 4, **kwargs) -> None:
        super().__init__(attention=False, **kwargs)
        from diffusers import UNet2DModel
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        size, channels = kwargs.get("sample_size", 32), tuple(kwargs.get("block_out_channels", (64, 128, 128)))
        levels = [size // 2**i in set(attention_resolutions) for i in range(len(channels))]
        if not any(levels) or num_heads < 1:
            return
        first = channels[levels.index(True)]
        if first % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the {first} channels at the first attention level")
        config = dict(self.unet.config)
        config.update(
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in levels),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)),
            attention_head_dim=first // num_heads,
        )
        self.unet = UNet2DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        decay = kwargs.get("ema_decay", 0.999)
        self.ema = AveragedModel(self.unet, multi_avg_fn=get_ema_multi_avg_fn(decay)) if decay > 0 else None


class EclipseDataModule(DiffusionPurifiedDataModule):
    """ECLIPSE's purified training split: sparse-set diffusion purification from t*, plus compensation.

    ``base``'s training split is purified once, offline (cached, resumable, DDP-sharded by
    :class:`DiffusionPurifiedDataModule`) by a DDPM trained once (cached by content) on the replicated
    sparse clean set; during training every batch gets fresh compensation in :meth:`on_after_batch_transfer`
    (before callbacks and the model's crop/flip); validation and test pass through untouched.

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

    Raises:
        ValueError: an argument out of range, or D_s larger than the validation split.

    Example::

        dm = EclipseDataModule(DigitsDataModule(image_size=16, num_channels=3), t_star=25,
                               num_train_timesteps=1000, block_out_channels=(32, 64), train_steps=300)
        dm.prepare_data(); dm.setup("fit")
    """

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
    ) -> None:
        if not 0.0 < clean_fraction <= 1.0:
            raise ValueError(f"clean_fraction (B/N) must be in (0, 1]; got {clean_fraction} (the paper uses 0.04)")
        if clean_size is not None and clean_size < 1:
            raise ValueError(f"clean_size (B) must be >= 1 or None; got {clean_size}")
        if replication < 0:
            raise ValueError(f"replication (M) must be >= 0; got {replication} (the paper uses 4)")
        if t_star < 1 or t_star > num_train_timesteps:
            raise ValueError(f"t_star must be in [1, num_train_timesteps={num_train_timesteps}]; got {t_star}")
        if not 0.0 <= grayscale_p <= 1.0:
            raise ValueError(f"grayscale_p must be in [0, 1]; got {grayscale_p} (the paper uses 0.4)")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0 ([0,1] pixel units); got {noise_std} (the paper uses 0.05)")
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1; got {num_heads}")
        if train_steps < 1 or train_batch_size < 1:
            raise ValueError(f"train_steps and train_batch_size must be >= 1; got {train_steps}, {train_batch_size}")
        if clean_subset is not None and not isinstance(clean_subset, (list, tuple, L.LightningDataModule)):
            raise TypeError(
                f"clean_subset must be None, a list of validation-split indices or a LightningDataModule; "
                f"got {type(clean_subset).__name__}"
            )
        super().__init__(
            base, denoiser="<trained by EclipseDataModule>", sigma=None, seed=seed, steps=t_star,
            timestep=t_star - 1, batch_size=batch_size, chunk_size=chunk_size, cache_dir=cache_dir,
            storage=storage, device=device, progress=progress,
        )
        self.clean_subset = list(clean_subset) if isinstance(clean_subset, (list, tuple)) else clean_subset
        self.clean_fraction = float(clean_fraction)
        self.clean_size = clean_size
        self.replication = int(replication)
        self.t_star = int(t_star)
        self.diffusion = bool(diffusion)
        self.grayscale_p = float(grayscale_p)
        self.noise_std = float(noise_std)
        self.model_kwargs = dict(
            num_train_timesteps=int(num_train_timesteps), block_out_channels=tuple(int(c) for c in block_out_channels),
            layers_per_block=int(layers_per_block), attention_resolutions=tuple(int(r) for r in attention_resolutions),
            num_heads=int(num_heads), dropout=float(dropout), ema_decay=float(ema_decay), lr=float(lr),
            beta_schedule="squaredcos_cap_v2", learn_variance=True, vlb_weight=0.001,
        )
        self.train_steps = int(train_steps)
        self.train_batch_size = int(train_batch_size)
        self.model_dir = Path(model_dir)
        self._compensation_calls = (-1, -1, 0)  # (epoch, global step, calls within that step)

    # -- Lightning hooks ---------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.diffusion:
            super().prepare_data()
        else:
            TrainSplitWrapper.prepare_data(self)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.diffusion:
            super().setup(stage)
        else:
            TrainSplitWrapper.setup(self, stage)

    def wrap_train(self, train_set: Dataset) -> Dataset:
        return super().wrap_train(train_set) if self.diffusion else train_set

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Compensation on training batches only, seeded by (seed, epoch, global step, rank, call)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.training or (self.grayscale_p == 0 and self.noise_std == 0):
            return batch
        epoch, step = trainer.current_epoch, trainer.global_step
        last_epoch, last_step, calls = self._compensation_calls
        calls = calls + 1 if (epoch, step) == (last_epoch, last_step) else 0
        self._compensation_calls = (epoch, step, calls)
        generator = self.compensation_generator(epoch, step, trainer.global_rank, calls)
        images, *rest = batch
        return [compensate(images, self.grayscale_p, self.noise_std, generator), *rest]

    def compensation_generator(self, epoch: int, step: int, rank: int = 0, call: int = 0) -> torch.Generator:
        """The CPU generator of one training batch's compensation."""
        key = fingerprint("eclipse-compensation", self.noise_seed, epoch, step, rank, call)
        return torch.Generator().manual_seed(int(key[:15], 16))

    # -- Algorithm 1, lines 1-10: the sparse set and the diffusion model -----------------------------
    def sparse_set(self) -> Tensor:
        """D_s as [0, 1] images (user indices or datamodule, else a seeded sample of the validation split)."""
        if isinstance(self.clean_subset, L.LightningDataModule):
            self.clean_subset.setup("fit")
            images = dataset_tensors(self.clean_subset.train_set)[0]
            expected = tuple(self._train_images().shape[1:])
            if tuple(images.shape[1:]) != expected:
                raise ValueError(
                    f"clean_subset {type(self.clean_subset).__name__}'s images are shaped {tuple(images.shape[1:])}; "
                    f"the training images of {type(self.base).__name__} are {expected}: match image_size/num_channels"
                )
            return images
        self.base.setup("fit")
        held_out = getattr(self.base, "val_set", None)
        if held_out is None or len(held_out) == 0:
            raise ValueError(
                f"{type(self.base).__name__} has no validation split to draw the sparse clean set D_s from; give "
                "it one (e.g. val_fraction / val_size) or pass clean_subset=<a clean datamodule>"
            )
        available = len(held_out)
        if self.clean_subset is not None:
            indices = torch.tensor(self.clean_subset, dtype=torch.long)
            if len(indices) == 0 or int(indices.min()) < 0 or int(indices.max()) >= available:
                raise ValueError(
                    f"clean_subset indices must be non-empty and in [0, {available}) (the validation split of "
                    f"{type(self.base).__name__}); got {len(indices)} indices in "
                    f"[{int(indices.min()) if len(indices) else '-'}, {int(indices.max()) if len(indices) else '-'}]"
                )
        else:
            size = self.clean_size or max(1, round(self.clean_fraction * len(self.base.train_set)))
            if size > available:
                raise ValueError(
                    f"the sparse set needs {size} images (clean_size / clean_fraction={self.clean_fraction} of "
                    f"{len(self.base.train_set)}) but the validation split has {available}; enlarge it or lower them"
                )
            generator = torch.Generator().manual_seed(self.noise_seed)
            indices = torch.randperm(available, generator=generator)[:size].sort().values
        return dataset_tensors(held_out)[0][indices]

    def augmented_set(self) -> Tensor:
        """D_A: D_s with M copies, ``(M + 1) * |D_s|`` images."""
        return replicate(self.sparse_set(), self.replication)

    def model_key(self, augmented: Tensor) -> str:
        """Content key of the diffusion model: D_A, every training setting, the seed and the code version."""
        return fingerprint(
            TRAIN_CODE_VERSION, augmented, self.model_kwargs, self.train_steps, self.train_batch_size, self.noise_seed
        )

    def get_denoiser(self) -> Denoiser:
        """The sparse-set diffusion model: loaded from ``model_dir`` or trained there first (rank 0)."""
        if self._denoiser is None:
            self._denoiser = load_denoiser(self.train_diffusion_model())
        return self._denoiser

    def train_diffusion_model(self) -> Path:
        """Train the DDPM on D_A unless a model with the same key exists; return its directory.

        Under DDP, global rank 0 trains and writes; the others wait at a barrier.
        """
        augmented = self.augmented_set()
        target = self.model_dir / f"eclipse-ddpm-{self.model_key(augmented)[:20]}"
        dist = torch.distributed
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not target.is_dir() and (not distributed or dist.get_rank() == 0):
            model = self.fit_diffusion(augmented)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
        if distributed:
            dist.barrier()
        return target

    def fit_diffusion(self, augmented: Tensor) -> DiffusionModel:
        """Algorithm 1, lines 5-9: I iterations of the hybrid loss on shuffled epochs of D_A (seeded).

        The global random state is seeded inside and restored afterwards.
        """
        device = self._device()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.noise_seed)
            return self._fit_diffusion(augmented, device)

    def _fit_diffusion(self, augmented: Tensor, device: torch.device) -> DiffusionModel:
        model = EclipseUNetModel(sample_size=augmented.shape[-1], in_channels=augmented.shape[1], **self.model_kwargs)
        model.to(device).train()
        model.unet.requires_grad_(True)
        optimizer = model.configure_optimizers()["optimizer"]
        generator = torch.Generator().manual_seed(self.noise_seed)
        loader = DataLoader(TensorDataset(augmented), batch_size=self.train_batch_size, shuffle=True, generator=generator)
        rank_zero_info(f"training the ECLIPSE diffusion model on |D_A| = {len(augmented)} images for {self.train_steps} steps")
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.train_steps, desc="ECLIPSE sparse diffusion training", unit="step")
        step = 0
        while step < self.train_steps:
            for (images,) in loader:
                loss = model.diffusion_loss(images.to(device), generator=None)["loss"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if model.ema is not None:
                    model.ema.update_parameters(model.unet)
                step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.detach().item():.4f}")
                if step >= self.train_steps:
                    break
        if bar is not None:
            bar.close()
        return model.eval()

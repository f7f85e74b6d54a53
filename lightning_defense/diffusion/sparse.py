"""ECLIPSE's sparse-set denoiser (Wang et al., "Expunging Clean-label Indiscriminate Poisons via Sparse
Diffusion Purification", Algorithm 1, lines 1-10).

* **Replication**: D_A = D_s together with M copies of it, ``(M + 1) * |D_s|`` images (lines 1-4).
* **Sparse diffusion training** from scratch on D_A (lines 5-9): an improved-DDPM UNet (Nichol & Dhariwal:
  cosine schedule, learned-range variance, hybrid loss, attention at chosen resolutions).

:class:`SparseDenoiserBuilder` trains that model once per content (D_A, every setting, the seed, the code
version) and keeps it in diffusers format under ``model_dir``: global rank 0 trains and writes the
directory atomically (with the SHA-256 of every file in ``sha256.json``) while the other ranks wait at a
barrier; a kept model is used only when its files match their digests, otherwise it is trained again.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

from lightning_defense.core.collective import Collective
from lightning_defense.core.store import CorruptStoreError, atomic_write, file_digest, fingerprint
from lightning_defense.diffusion.denoiser import Denoiser, load_denoiser
from lightning_defense.diffusion.training import DiffusionModel

#: Bump when a change to the training code changes the trained model: old models are then not reused.
TRAIN_CODE_VERSION = "eclipse-ddpm-1"
#: The file in a kept model's directory that lists the SHA-256 of every other file in it.
DIGESTS = "sha256.json"


def replicate(sparse_set: Tensor, replication: int) -> Tensor:
    """D_A = D_s together with M copies of it (Algorithm 1, lines 1-4): ``(M + 1) * len(D_s)`` images."""
    if replication < 0:
        raise ValueError(f"replication (M) must be >= 0; got {replication}")
    return sparse_set.repeat(replication + 1, *([1] * (sparse_set.dim() - 1)))


class ImprovedDiffusionModel(DiffusionModel):
    """:class:`DiffusionModel` with improved-DDPM attention: at the given resolutions, with ``num_heads`` heads.

    ECLIPSE's CIFAR-10 model: channels 128 x (1, 2, 2, 2), 3 res blocks, attention at 16 and 8, 4 heads.
    The heads are counted at the first attention level (diffusers sets a head dimension).
    """

    def __init__(self, attention_resolutions: Sequence[int] = (16, 8), num_heads: int = 4, **kwargs) -> None:
        super().__init__(attention=False, **kwargs)
        from diffusers import UNet2DModel

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


def verify_model_dir(directory: Union[str, Path]) -> None:
    """Check a kept model: every file listed in its ``sha256.json`` (the weights among them) matches its digest.

    Raises:
        CorruptStoreError: the digest list is missing or unreadable, lists no weights, or a file is missing
            or does not match its digest (named in the message).
    """
    directory = Path(directory)
    listing = directory / DIGESTS
    try:
        digests = json.loads(listing.read_text())
    except (OSError, ValueError) as err:
        raise CorruptStoreError(f"{listing} is missing or unreadable ({err}): the model cannot be verified") from err
    if not isinstance(digests, dict) or not any(str(name).endswith(".safetensors") for name in digests):
        raise CorruptStoreError(f"{listing} lists no .safetensors weights: the model cannot be verified")
    for name, digest in sorted(digests.items()):
        path = directory / name
        if not path.is_file():
            raise CorruptStoreError(f"{path} is listed in {DIGESTS} but missing")
        if file_digest(path) != digest:
            raise CorruptStoreError(f"{path} does not match its SHA-256 in {DIGESTS}: the file is damaged")


class SparseDenoiserBuilder:
    """ECLIPSE's sparse-set DDPM (Algorithm 1, lines 1-10): trained once on D_A, kept by content, verified on reuse.

    Args:
        model_dir: Where trained models are kept (one directory per content key).
        replication: M; D_A has ``(M + 1) * |D_s|`` items.
        num_train_timesteps: T of the cosine schedule.
        block_out_channels: UNet channels per resolution.
        layers_per_block: Res blocks per resolution.
        attention_resolutions: Resolutions with self-attention.
        num_heads: Attention heads.
        dropout: UNet dropout.
        train_steps: I, training iterations.
        train_batch_size: Training batch size.
        lr: AdamW learning rate.
        ema_decay: EMA of the weights (the EMA model is kept and denoises).
        seed: Seed of the training (initialisation, shuffling, timesteps and noise).
        progress: A progress bar while training.

    Raises:
        ValueError: an argument out of range.

    Example::

        builder = SparseDenoiserBuilder("runs/cache/eclipse_ddpm", num_train_timesteps=1000,
                                        block_out_channels=(32, 64), attention_resolutions=(8,), train_steps=300)
        denoiser = builder.build(sparse_set, Collective.of(trainer))
    """

    def __init__(
        self,
        model_dir: Union[str, Path],
        replication: int = 4,
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
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        if replication < 0:
            raise ValueError(f"replication (M) must be >= 0; got {replication} (the paper uses 4)")
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1; got {num_heads}")
        if train_steps < 1 or train_batch_size < 1:
            raise ValueError(f"train_steps and train_batch_size must be >= 1; got {train_steps}, {train_batch_size}")
        self.model_dir = Path(model_dir)
        self.replication = int(replication)
        self.model_kwargs = dict(
            num_train_timesteps=int(num_train_timesteps), block_out_channels=tuple(int(c) for c in block_out_channels),
            layers_per_block=int(layers_per_block), attention_resolutions=tuple(int(r) for r in attention_resolutions),
            num_heads=int(num_heads), dropout=float(dropout), ema_decay=float(ema_decay), lr=float(lr),
            beta_schedule="squaredcos_cap_v2", learn_variance=True, vlb_weight=0.001,
        )
        self.train_steps = int(train_steps)
        self.train_batch_size = int(train_batch_size)
        self.seed = int(seed)
        self.progress = progress

    def augment(self, sparse_set: Tensor) -> Tensor:
        """D_A: D_s with M copies, ``(M + 1) * |D_s|`` images."""
        return replicate(sparse_set, self.replication)

    def key(self, augmented: Tensor) -> str:
        """Content key of the model: D_A, every training setting, the seed and the code version."""
        return fingerprint(
            TRAIN_CODE_VERSION, augmented, self.model_kwargs, self.train_steps, self.train_batch_size, self.seed
        )

    def directory(self, augmented: Tensor) -> Path:
        """Where the model trained on ``augmented`` is kept."""
        return self.model_dir / f"eclipse-ddpm-{self.key(augmented)[:20]}"

    def build(
        self, sparse_set: Tensor, collective: Optional[Collective] = None, device: Union[str, torch.device] = "cpu"
    ) -> Denoiser:
        """The denoiser trained on D_A = ``sparse_set`` replicated: kept, or trained first by global rank 0.

        Rank 0 reuses a kept model whose files match their digests, and otherwise trains one on ``device``
        and writes it (a damaged one is replaced); the other ranks wait at a barrier, and every rank
        verifies the files before loading them.
        """
        collective = collective or Collective()
        augmented = self.augment(sparse_set)
        target = self.directory(augmented)
        if collective.rank == 0 and not self._reusable(target):
            self._save(self.train(augmented, torch.device(device)), target)
        collective.barrier("sparse denoiser written")
        verify_model_dir(target)
        return load_denoiser(target)

    def train(self, augmented: Tensor, device: torch.device) -> ImprovedDiffusionModel:
        """Algorithm 1, lines 5-9: I iterations of the hybrid loss on shuffled epochs of D_A.

        The random streams are today's shipped ones (the global torch seed and a shuffling generator, both
        ``seed``), so kept models and results stay reproducible; the global random state is restored afterwards.
        """
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            return self._train(augmented, device)

    def _train(self, augmented: Tensor, device: torch.device) -> ImprovedDiffusionModel:
        model = ImprovedDiffusionModel(sample_size=augmented.shape[-1], in_channels=augmented.shape[1], **self.model_kwargs)
        model.to(device).train()
        model.unet.requires_grad_(True)
        optimizer = model.configure_optimizers()["optimizer"]
        loader = DataLoader(TensorDataset(augmented), batch_size=self.train_batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(self.seed))
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

    @staticmethod
    def _reusable(target: Path) -> bool:
        """Whether ``target`` holds a verified model; a damaged or unverifiable one is removed (it is retrained)."""
        if not target.exists():
            return False
        try:
            verify_model_dir(target)
            return True
        except CorruptStoreError as err:
            rank_zero_warn(f"{err}; training the ECLIPSE diffusion model again")
        aside = _unique_sibling(target, "damaged")
        os.replace(target, aside)
        shutil.rmtree(aside)
        return False

    @staticmethod
    def _save(model: DiffusionModel, target: Path) -> None:
        """Write the model and ``sha256.json`` into a unique temporary directory, then move it into place."""
        tmp = _unique_sibling(target, "tmp")
        tmp.mkdir(parents=True)
        try:
            model.save_pretrained(tmp)
            digests = {p.relative_to(tmp).as_posix(): file_digest(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            atomic_write(tmp / DIGESTS, json.dumps(digests, indent=1, sort_keys=True))
            try:
                os.replace(tmp, target)
            except OSError:
                if not target.is_dir():
                    raise  # otherwise another job kept the same model first: the build verifies that one
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _unique_sibling(path: Path, suffix: str) -> Path:
    """A hidden name next to ``path`` that no other process uses."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.{suffix}")

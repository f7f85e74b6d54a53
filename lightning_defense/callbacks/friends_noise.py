"""FRIENDS: friendly noise plus random noise on every training batch (Liu, Mirzasoleiman et al., 2022).

"Friendly Noise against Adversarial Noise: A Powerful Defense against Data Poisoning Attacks".
Algorithm 1 finds, once, the largest per-sample perturbation ``eps_i`` within ``+-zeta`` that keeps the
model's prediction (small KL divergence); Algorithm 2 then trains on ``x_i + eps_i + mu`` with fresh
random noise ``mu`` at every iteration, in [0, 1] pixel space, before augmentation and normalisation.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_defense.callbacks.modes import defense_pass
from lightning_defense.core.batch import dataset_tensors, require_pixel_range, unpack_batch
from lightning_defense.core.collective import Collective
from lightning_defense.core.pixels import Normalization, PixelSpace, PixelView
from lightning_defense.core.rng import generator, per_sample_uniform
from lightning_defense.core.seam import DATASET, TrainingDataSeam, rebuild_loader
from lightning_defense.core.store import ChunkCache, CorruptStoreError, atomic_write, fill_cache, fingerprint

NOISE_TYPES = ("bernoulli", "uniform", "gaussian")
_FILE_FORMAT = "friends-int8-v1"
_LEVELS = 127  # int8 storage: friendly noise in units of zeta / 127
_CODE_VERSION = "friends-chunks-v1"  # part of the cache key: bump when Algorithm 1's code changes its output
_RANDOM_NOISE = 0xF1F  # purpose key of the per-sample random noise mu on the dataset path


def friendly_noise_step_loss(model, x: Tensor, eps: Tensor, log_p_clean: Tensor, zeta: float, lam: float) -> Tensor:
    """Per-sample objective of Eq. (3): ``KL(f(x + eps) || f(x)) - lam * mean(eps^2)``.

    ``eps`` is clamped to ``+-zeta`` and the perturbed image to [0, 1]. The size term is the FRIENDS
    code's mean of squares (for which lr=100, lam=1 are tuned); footnote 2 of the paper reports that the
    choice of norm matters little.
    """
    e = eps.clamp(-zeta, zeta)
    log_p = F.log_softmax(model((x + e).clamp(0.0, 1.0)), dim=1)
    kl = (log_p.exp() * (log_p - log_p_clean)).sum(dim=1)
    return kl - lam * e.pow(2).flatten(1).mean(dim=1)


def generate_friendly_noise(
    model,
    x: Tensor,
    indices: Tensor,
    zeta: float = 16 / 255,
    steps: int = 20,
    lr: float = 100.0,
    lam: float = 1.0,
    init_eps: float = 8 / 255,
    seed: int = 0,
    loss_scale: float = 128.0,
) -> Tensor:
    """Algorithm 1 of FRIENDS for one batch: optimise each sample's ``eps`` with Nesterov SGD.

    Each sample's ``eps^0`` is drawn from U(-init_eps, init_eps) keyed by its index; ``steps`` SGD steps
    (momentum 0.9, Nesterov) minimise :func:`friendly_noise_step_loss`. The batch loss is the sum of the
    per-sample losses divided by the constant ``loss_scale`` (the FRIENDS code's batch mean over 128), so
    a sample's result does not depend on which other samples share its batch. Call it with the model in
    eval mode so that BatchNorm uses its running statistics.

    Args:
        model: Maps images in [0, 1] to logits.
        x: (N, C, H, W) clean images in [0, 1].
        indices: (N,) dataset indices (seed the initialisation).
        zeta: l_inf bound of the friendly noise.
        steps: SGD steps T (the paper's 20; the FRIENDS code uses 30).
        lr: SGD learning rate eta_opt.
        lam: lambda, the weight of the size term.
        init_eps: Bound of the uniform initialisation epsilon_init.
        seed: Seed of the initialisation.
        loss_scale: Divisor of the summed per-sample losses.

    Returns:
        The friendly noise ``eps`` in [-zeta, zeta], shaped like ``x``.
    """
    with torch.no_grad():
        log_p_clean = F.log_softmax(model(x), dim=1)
    eps = per_sample_uniform(seed, indices.cpu(), tuple(x.shape[1:]), init_eps).to(x.device, x.dtype)
    eps.requires_grad_(True)
    optimizer = torch.optim.SGD([eps], lr=lr, momentum=0.9, nesterov=True)
    with torch.enable_grad():
        for _ in range(steps):
            loss = friendly_noise_step_loss(model, x, eps, log_p_clean, zeta, lam).sum() / loss_scale
            (eps.grad,) = torch.autograd.grad(loss, [eps])  # only eps: the model's .grad stays untouched
            optimizer.step()
    return eps.detach().clamp(-zeta, zeta)


def _quantize(eps: Tensor, zeta: float) -> Tensor:
    return torch.round(eps / zeta * _LEVELS).clamp_(-_LEVELS, _LEVELS).to(torch.int8)


def _draw_noise(noise_type: str, mu: float, x: Tensor, stream: torch.Generator) -> Tensor:
    """FRIENDS' random noise shaped like ``x``: +-mu (bernoulli), U[-mu, mu] (uniform) or N(0, mu^2) (gaussian)."""
    if noise_type == "bernoulli":
        signs = torch.rand(x.shape, generator=stream, device=x.device, dtype=x.dtype) < 0.5
        return signs.to(x.dtype).mul_(2 * mu).sub_(mu)
    if noise_type == "uniform":
        return torch.rand(x.shape, generator=stream, device=x.device, dtype=x.dtype).mul_(2 * mu).sub_(mu)
    return torch.randn(x.shape, generator=stream, device=x.device, dtype=x.dtype).mul_(mu)


class FriendlyPixels(Dataset):
    """A user's training set as FRIENDS trains on it: item i is ``(clamp(x_i + eps_i + mu_i, 0, 1), y_i, i)``.

    ``x_i`` are sample i's un-augmented pixels (:meth:`PixelView.item_pixels`), ``eps_i`` its friendly noise
    (``noise``, int8 in units of ``zeta / 127``, from ``begin_epoch`` on) and ``mu_i`` random noise from the
    stream keyed by ``(seed, epoch, i)``: the same for a sample whatever the workers, order or ranks.
    :meth:`PixelView.dress` then applies the user's augmentation and normalisation, after the noise.
    """

    def __init__(self, view: PixelView, zeta: float, noise_type: Optional[str], noise_eps: float, seed: int,
                 begin_epoch: int) -> None:
        self.view, self.zeta, self.noise_type, self.noise_eps = view, zeta, noise_type, noise_eps
        self.seed, self.begin_epoch = seed, begin_epoch
        self.noise: Optional[Tensor] = None
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, index: int):
        pixels, label = self.view.item_pixels(index)
        self.view.space.check(pixels, "FriendsNoise", "training image")
        out = pixels
        if self.noise is not None and self.epoch >= self.begin_epoch:
            friendly = self.noise[index]
            if friendly.shape != pixels.shape:
                raise ValueError(f"friendly noise is shaped {tuple(friendly.shape)} per sample but the training images "
                                 f"are {tuple(pixels.shape)}")
            out = out + friendly.to(pixels.dtype) * (self.zeta / _LEVELS)
        if self.noise_type is not None:
            stream = generator(self.seed, self.epoch, index, _RANDOM_NOISE)
            out = out + _draw_noise(self.noise_type, self.noise_eps, pixels, stream)
        return out.clamp(0.0, 1.0), label, index


class FriendsNoise(Callback):
    """FRIENDS (Liu et al., 2022): friendly noise from ``begin_epoch`` on, random noise throughout.

    * Before ``begin_epoch`` every training batch gets random noise only (the paper's first 5 epochs).
    * At the start of ``begin_epoch`` the current model, in eval mode, generates friendly noise for every
      training sample (Algorithm 1, :func:`generate_friendly_noise`) over the training set, without
      shuffling or augmentation. Under DDP the batches are split across the ranks and gathered, so every
      rank holds all of it, stored as int8 in units of ``zeta / 127``.
    * From then on every sample gets its friendly noise plus fresh random noise, in [0, 1] pixel space,
      clamped to [0, 1] (Algorithm 2), before augmentation and normalisation (the paper's order).

    Generation writes atomic int8 chunks of ``chunk_size`` samples into ``noise_dir/friends-<key>/`` (a
    manifest last), where the key hashes everything that determines the noise: the model's weights at
    ``begin_epoch``, the training images, zeta, steps, lr, lam, init_eps, batch_size, seed, chunk size and
    the code version. A generation that was killed resumes from its finished chunks and gives the same
    tensor. Under DDP the ranks compute alternate chunks, global rank 0 writes them all, and every rank
    then reads the whole tensor back (the directory must be on a filesystem all ranks see, like the
    checkpoint). The checkpoint holds only a reference (path and SHA-256 digest) to this side file, so a
    resumed run reads it back instead of regenerating; :meth:`save` / ``noise_file`` move the noise to
    another run or architecture (the paper's transfer).

    **Your own project.** Where the noise is added depends on the training set (seen through a
    :class:`~lightning_defense.core.pixels.PixelView`):

    * this package's own ``(image, label, index)`` items of pixels in [0, 1], with no transform: each
      batch gets its noise in ``on_train_batch_start`` (looked up by index); the LightningModule augments
      and normalises in ``training_step`` (``ImageClassifier(mean=..., std=...)`` does);
    * anything else, e.g. ``(x, y)`` tuples or dicts, normalised by a torchvision ``Normalize`` or by a
      ``normalization=(mean, std)`` given once, augmenting with ``RandomCrop``/``RandomHorizontalFlip`` in
      the dataset's transform: the training loader is rebuilt (through the
      :class:`~lightning_defense.core.seam.TrainingDataSeam`) over :class:`FriendlyPixels`, which adds the
      noise to each sample's un-augmented pixels; the user's own random ops and ``Normalize`` follow. The
      batches keep the user's layout and normalisation, so ``training_step`` stays as it is, and sample i's
      friendly noise always lands on sample i, before its crop and flip. The generation reads the
      un-augmented pixels and runs the model on them through the normalisation.

    Data outside [0, 1] pixels is a clear error naming the fix, never clamped silently. **Limitations**:
    augmentation done inside ``__getitem__`` outside a torchvision transform cannot be separated from the
    image (the generation refuses a dataset whose items change between reads); on the dataset path the
    loader may not use ``persistent_workers`` with workers, and friendly noise generated at the fit's
    first epoch needs ``num_workers=0`` (or ``begin_epoch >= 1``): that epoch's workers start before it
    exists.

    Args:
        begin_epoch: Epoch at whose start the friendly noise is generated (the paper's 5; 0 for a
            pretrained model).
        zeta: l_inf bound of the friendly noise (paper: 16/255).
        noise_type: Random noise: ``"bernoulli"`` (+-noise_eps per pixel), ``"uniform"``
            (U[-noise_eps, noise_eps]), ``"gaussian"`` (std noise_eps) or None (friendly noise only).
        noise_eps: mu, the random-noise scale (paper: 16/255).
        steps: Optimisation steps per batch (paper: 20).
        lr: Learning rate of the noise optimisation (100).
        lam: lambda, weight of the noise-size term (1).
        init_eps: Bound of the uniform initialisation (8/255).
        batch_size: Batch size of the generation pass (128).
        seed: Seed of the initialisation and of the random noise.
        noise_file: A ``.safetensors`` file written by :meth:`save`; when given, it is used instead of
            generating (e.g. noise generated with a smaller architecture).
        save_file: Where to write the generated noise (global rank 0), for reuse with ``noise_file``.
        noise_dir: Root of the chunked friendly-noise caches (default ``<default_root_dir>/friendly_noise``).
        chunk_size: Samples per chunk file (256), rounded up to a multiple of ``batch_size``; the unit of
            resumption and of the progress bar.
        regenerate_missing: On resume, when the checkpoint's side file is gone, generate new friendly noise
            with the resumed model instead of raising (the noise then differs from the original run's).
        normalization: ``((mean, ...), (std, ...))`` the training images were normalised with, when no
            torchvision ``Normalize`` in the dataset's transform or ``normalization`` attribute of the dataset
            or datamodule says so.
        image_key, label_key: Dict items: the keys of the image and the label (found by name otherwise).

    Raises:
        ValueError: On an argument out of range or an unknown ``noise_type``; at the fit's start, on training
            data whose pixel range cannot be told (naming the fix) or a loader the dataset path cannot serve.
        FileNotFoundError: At resume, when the checkpoint's friendly noise side file is missing (unless
            ``regenerate_missing``).

    Example::

        trainer = L.Trainer(max_epochs=80, callbacks=[FriendsNoise(begin_epoch=5, noise_type="bernoulli")])
        trainer.fit(ImageClassifier("resnet18_cifar"), datamodule=CIFAR10DataModule("data"))
    """

    def __init__(
        self,
        begin_epoch: int = 5,
        zeta: float = 16 / 255,
        noise_type: Optional[str] = "bernoulli",
        noise_eps: float = 16 / 255,
        steps: int = 20,
        lr: float = 100.0,
        lam: float = 1.0,
        init_eps: float = 8 / 255,
        batch_size: int = 128,
        seed: int = 0,
        noise_file: Optional[Union[str, Path]] = None,
        save_file: Optional[Union[str, Path]] = None,
        noise_dir: Optional[Union[str, Path]] = None,
        chunk_size: int = 256,
        regenerate_missing: bool = False,
        normalization: Optional[Normalization] = None,
        image_key: Optional[str] = None,
        label_key: Optional[str] = None,
    ) -> None:
        if not isinstance(begin_epoch, int) or begin_epoch < 0:
            raise ValueError(f"begin_epoch must be an integer >= 0; got {begin_epoch!r}")
        if not 0 < zeta <= 1:
            raise ValueError(f"zeta must be in (0, 1] (l_inf bound in [0,1] pixel units, e.g. 16/255); got {zeta}")
        if noise_type is not None and noise_type not in NOISE_TYPES:
            raise ValueError(f"noise_type must be one of {NOISE_TYPES} or None; got {noise_type!r}")
        if noise_type is not None and not 0 < noise_eps <= 1:
            raise ValueError(f"noise_eps must be in (0, 1] ([0,1] pixel units, e.g. 16/255); got {noise_eps}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0; got {lr}")
        if lam < 0:
            raise ValueError(f"lam must be >= 0; got {lam}")
        if not 0 <= init_eps <= zeta:
            raise ValueError(f"init_eps must be in [0, zeta={zeta}]; got {init_eps}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1 (samples per chunk file); got {chunk_size!r}")
        if noise_file is not None and not Path(noise_file).is_file():
            raise FileNotFoundError(f"noise_file {str(noise_file)!r} does not exist; write one with FriendsNoise.save()")
        self.begin_epoch = begin_epoch
        self.zeta = float(zeta)
        self.noise_type = noise_type
        self.noise_eps = float(noise_eps)
        self.steps = steps
        self.lr = float(lr)
        self.lam = float(lam)
        self.init_eps = float(init_eps)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.noise_file = noise_file
        self.save_file = save_file
        self.noise_dir = None if noise_dir is None else Path(noise_dir)
        self.chunk_size = math.ceil(chunk_size / batch_size) * batch_size  # batches never straddle two chunks
        self.regenerate_missing = bool(regenerate_missing)
        PixelSpace.of(normalization)  # a malformed pair fails here, not at the fit
        self.normalization = normalization
        self.image_key, self.label_key = image_key, label_key
        self._view: Optional[PixelView] = None  # the dataset path's view of the user's training set
        self._pixels: Optional[FriendlyPixels] = None  # ... and the noisy pixels its training loader reads
        self._first_loader = True
        self._noise: Optional[Tensor] = None  # int8 (N, C, H, W) on the CPU, units of zeta / 127
        self._source: Optional[dict[str, Any]] = None  # where the noise lives on disk: the checkpoint's reference
        self._noise_on_device: Optional[Tensor] = None
        self._generator: Optional[torch.Generator] = None
        if noise_file is not None:
            self.load(noise_file)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            begin_epoch=self.begin_epoch, zeta=self.zeta, noise_type=self.noise_type, noise_eps=self.noise_eps,
            seed=self.seed,
        )

    @property
    def friendly_noise(self) -> Optional[Tensor]:
        """The friendly noise as float in [-zeta, zeta], (N, C, H, W) on the CPU; None before generation."""
        return None if self._noise is None else self._noise.float() * (self.zeta / _LEVELS)

    # ---------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """A reference to the side file (path, kind, digest), not the tensor.

        Noise that has no side file (set in memory, or read from an old checkpoint that embedded it) is
        embedded as before.
        """
        if self._noise is not None and self._source is None:
            return {"friendly_noise": self._noise, "zeta": self.zeta}
        return {"friendly_noise_source": self._source, "zeta": self.zeta}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Read the friendly noise back from the side file the checkpoint names (or from the checkpoint itself).

        Raises:
            FileNotFoundError: The side file is gone and ``regenerate_missing`` is False.
            ValueError: The side file's content does not match the checkpoint's digest, or zeta differs.
        """
        self._check_zeta(state_dict.get("zeta", self.zeta), "the checkpoint")
        source = state_dict.get("friendly_noise_source")
        if source is not None:
            try:
                noise = _read_source(source)
            except FileNotFoundError as error:
                if not self.regenerate_missing:
                    raise FileNotFoundError(
                        f"the checkpoint's friendly noise lives in {source['path']!r}, which is missing or incomplete "
                        f"({error}). Copy that {'directory' if source['kind'] == 'chunks' else 'file'} back, or pass "
                        "FriendsNoise(regenerate_missing=True) to generate new friendly noise with the resumed model"
                    ) from error
                rank_zero_warn(
                    f"FriendsNoise: the friendly noise side file {source['path']!r} is missing; regenerating it with "
                    "the resumed model (regenerate_missing=True), so it will differ from the original run's"
                )
                self._noise, self._source, self._noise_on_device = None, None, None
                return
            if fingerprint(noise) != source["digest"]:
                raise ValueError(
                    f"the friendly noise in {source['path']!r} does not match the checkpoint's digest: it was "
                    "overwritten or corrupted; restore the original, or delete it and pass regenerate_missing=True"
                )
            self._set_noise(noise, source)
            return
        noise = state_dict.get("friendly_noise")  # checkpoints written before the side file embed the tensor
        if noise is not None:
            self._set_noise(noise)

    def save(self, path: Union[str, Path]) -> None:
        """Write the friendly noise to a ``.safetensors`` file (atomically), for ``noise_file=``."""
        from safetensors.torch import save

        if self._noise is None:
            raise RuntimeError("FriendsNoise.save: no friendly noise yet (it is generated at begin_epoch)")
        metadata = {"format": _FILE_FORMAT, "zeta": repr(self.zeta)}
        atomic_write(path, save({"friendly_noise": self._noise.contiguous()}, metadata=metadata))

    def load(self, path: Union[str, Path]) -> None:
        """Read friendly noise written by :meth:`save` (possibly by another architecture's run)."""
        noise, zeta = _read_noise_file(path)
        self._check_zeta(zeta, repr(str(path)))
        noise = noise.contiguous()
        self._set_noise(noise, {"kind": "file", "path": str(Path(path).resolve()), "digest": fingerprint(noise)})

    def noise_cache(self, pl_module: torch.nn.Module, images: Tensor, root: Union[str, Path],
                    space: Optional[PixelSpace] = None) -> ChunkCache:
        """The chunk cache of the friendly noise for this model and these training images; computes nothing.

        Its key hashes the code version, the images, the model's weights and buffers, zeta, steps, lr, lam,
        init_eps, batch_size, seed, the chunk size and (when not the identity) the pixel space the model
        reads its images through.
        """
        model_key = fingerprint(pl_module.state_dict())
        settings = {
            "zeta": self.zeta, "steps": self.steps, "lr": self.lr, "lam": self.lam, "init_eps": self.init_eps,
            "batch_size": self.batch_size, "seed": self.seed, "chunk_size": self.chunk_size,
        }
        if space is not None and not space.identity:
            settings["normalization"] = [list(space.mean), list(space.std)]
        key = fingerprint(_CODE_VERSION, images, model_key, settings)
        meta = {"code_version": _CODE_VERSION, "model": model_key, "key": key, **settings}
        return ChunkCache(
            Path(root) / f"friends-{key[:20]}", len(images), tuple(images.shape[1:]), "int8", self.chunk_size, meta
        )

    def _check_zeta(self, zeta: float, source: str) -> None:
        if not math.isclose(zeta, self.zeta, rel_tol=1e-6):
            raise ValueError(f"the friendly noise in {source} was generated with zeta={zeta}; this FriendsNoise has zeta={self.zeta}")

    def _set_noise(self, noise: Tensor, source: Optional[dict[str, Any]] = None) -> None:
        self._noise = noise.to("cpu", torch.int8).contiguous()
        self._noise_on_device = None
        self._source = source  # None: no side file, so state_dict embeds the tensor

    # ---------------------------------------------------------------- hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._view, self._pixels, self._first_loader = None, None, True
        TrainingDataSeam.of(trainer).add(
            "FriendsNoise", lambda loader, is_train: self._training_loader(trainer, loader, is_train), DATASET)

    def _training_loader(self, trainer: L.Trainer, loader: Any, is_train: bool) -> Any:
        """The seam transform: the user's own training loader for native data, else one over :class:`FriendlyPixels`."""
        if not is_train or not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
            return loader
        first, self._first_loader = self._first_loader, False
        view = PixelView(loader.dataset, self.normalization, owner=trainer.datamodule, image_key=self.image_key,
                         label_key=self.label_key)
        if view.native:
            return loader  # the batch path, in on_train_batch_start
        epoch = trainer.fit_loop.epoch_progress.current.processed
        if loader.num_workers > 0 and loader.persistent_workers:
            raise ValueError(
                f"FriendsNoise adds its noise in the training set, whose epoch and friendly noise reach DataLoader "
                f"workers when they start; the training loader has persistent_workers=True with "
                f"num_workers={loader.num_workers}, so they would keep a stale copy. Build it with "
                "persistent_workers=False"
            )
        if first and loader.num_workers > 0 and self._noise is None and epoch >= self.begin_epoch:
            raise ValueError(
                f"FriendsNoise(begin_epoch={self.begin_epoch}) would generate the friendly noise at the fit's first "
                f"epoch ({epoch}), whose DataLoader workers (num_workers={loader.num_workers}) start before it exists "
                "and would train that epoch without it. Use num_workers=0 in the training loader, or begin_epoch >= "
                f"{epoch + 1} (the paper trains 5 epochs with random noise only), or pass a noise_file"
            )
        if len(view):
            view.space.check(view.item_pixels(0)[0], "FriendsNoise", "training image")
        pixels = FriendlyPixels(view, self.zeta, self.noise_type, self.noise_eps, self.seed, self.begin_epoch)
        pixels.epoch, pixels.noise = epoch, self._noise
        self._view, self._pixels = view, pixels
        return rebuild_loader(loader, dataset=view.dress(pixels))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        self._generator = None  # reseeded lazily on the batch's device from (seed, epoch, rank)
        if self._pixels is not None:
            self._pixels.epoch = epoch  # reaches workers started from now on (epochs after the fit's first)
        if epoch < self.begin_epoch:
            return
        dataset = _train_dataset(trainer) if self._pixels is None else self._view
        if self._noise is None:
            self._generate(trainer, pl_module, dataset)
            if self.save_file is not None:
                if trainer.global_rank == 0:
                    self.save(self.save_file)
                Collective.of(trainer).barrier("FriendsNoise.save")
        if dataset is not None and len(dataset) != len(self._noise):
            raise ValueError(
                f"FriendsNoise holds friendly noise for {len(self._noise)} samples but the training set has "
                f"{len(dataset)}; the noise must come from this training set (noise_file / checkpoint mismatch)"
            )
        if self._pixels is not None:
            self._pixels.noise = self._noise

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pixels is not None:
            return  # the dataset path: the noise is in the samples already
        x, _, indices = unpack_batch(batch)
        if indices is None:
            raise ValueError(
                "FriendsNoise needs each training batch as (images, labels, indices) to look up each sample's "
                "friendly noise; got (images, labels). Wrap your dataset in "
                "lightning_defense.datamodules.IndexedDataset or return (image, label, index) from __getitem__."
            )
        require_pixel_range(x, "FriendsNoise")
        friendly = self._noise is not None and trainer.current_epoch >= self.begin_epoch
        if not friendly and self.noise_type is None:
            return
        out = x
        if friendly:
            noise = self._device_noise(x.device)
            if noise.shape[1:] != x.shape[1:]:
                raise ValueError(f"friendly noise is shaped {tuple(noise.shape[1:])} per sample but the batch images are {tuple(x.shape[1:])}")
            if indices.device.type == "cpu" and len(indices) and int(indices.max()) >= len(noise):
                raise IndexError(f"batch index {int(indices.max())} is out of range for friendly noise of {len(noise)} samples")
            out = out + noise.index_select(0, indices.to(noise.device)).to(x.dtype) * (self.zeta / _LEVELS)
        if self.noise_type is not None:
            out = out + self._random_noise(x, trainer)
        out = out.clamp(0.0, 1.0)
        if isinstance(batch, list):
            batch[0] = out  # a new tensor: the dataset's own storage is never written
        else:
            x.copy_(out)

    # ---------------------------------------------------------------- internals
    def _device_noise(self, device: torch.device) -> Tensor:
        if self._noise_on_device is None or self._noise_on_device.device != device:
            self._noise_on_device = self._noise.to(device)
        return self._noise_on_device

    def _random_noise(self, x: Tensor, trainer: L.Trainer) -> Tensor:
        if self._generator is None or self._generator.device != x.device:
            self._generator = generator(self.seed, trainer.current_epoch, trainer.global_rank, device=x.device)
        return _draw_noise(self.noise_type, self.noise_eps, x, self._generator)

    def _generate(self, trainer: L.Trainer, pl_module: L.LightningModule,
                  dataset: Union[Dataset, PixelView, None]) -> Tensor:
        """Run Algorithm 1 over the training set into the chunk cache (resuming it); hold and return the int8 noise.

        ``dataset`` is the native training set, or the :class:`PixelView` of a user's: its un-augmented pixels,
        with the model reading them through the user's normalisation. Every rank computes every
        ``world_size``-th missing chunk, global rank 0 writes them (see
        :func:`~lightning_defense.core.store.fill_cache`), then every rank reads the whole cache.
        """
        if dataset is None:
            raise RuntimeError(
                "FriendsNoise could not find the training set: give the datamodule a train_set attribute "
                "or train from a DataLoader whose .dataset yields (image, label, index)"
            )
        if isinstance(dataset, PixelView):
            images, space = dataset.tensors("FriendsNoise")[0], dataset.space
        else:
            images, space = dataset_tensors(dataset)[0], PixelSpace()
            require_pixel_range(images, "FriendsNoise", "training set")
        model = space.model(pl_module)
        Collective.of(trainer).share_rank_zero_weights(pl_module)
        root = self.noise_dir if self.noise_dir is not None else Path(trainer.default_root_dir) / "friendly_noise"
        cache = self.noise_cache(pl_module, images, root, space)
        key = Collective.of(trainer).broadcast(cache.meta["key"], src=0)
        if key != cache.meta["key"]:
            raise RuntimeError(
                f"FriendsNoise: rank {trainer.global_rank} holds other training images (or another model) than rank 0 "
                "at generation time; every rank's datamodule must give the same train_set"
            )
        done = len(cache.ranges) - len(cache.missing())
        if cache.is_complete():
            rank_zero_info(f"FriendsNoise: reusing the friendly noise in {cache.directory}")
        else:
            rank_zero_info(
                f"FriendsNoise: generating friendly noise for {len(images)} samples at epoch {trainer.current_epoch} "
                f"into {cache.directory}" + (f" (resuming: {done}/{len(cache.ranges)} chunks done)" if done else "")
            )
        # in eval mode; afterwards every submodule gets its own mode back (a LinearProbe's extractor stays in eval).
        # Every rank calls fill_cache (it follows rank 0's view of the disk); a no-op but a barrier when complete.
        with defense_pass(trainer, pl_module):
            fill_cache(cache, lambda start, stop: self._friendly_range(model, images, start, stop),
                       desc="FRIENDS friendly noise", collective=Collective.of(trainer))
        if not cache.is_complete():
            raise RuntimeError(
                f"FriendsNoise: rank {trainer.global_rank} cannot see the friendly noise that rank 0 wrote to "
                f"{cache.directory}; set noise_dir to a directory on a filesystem that every rank shares"
            )
        noise = _read_chunks(cache)
        self._set_noise(noise, source={
            "kind": "chunks", "path": str(cache.directory.resolve()), "digest": fingerprint(noise),
            "num_samples": cache.num_samples, "sample_shape": list(cache.sample_shape), "chunk_size": cache.chunk_size,
        })
        return noise

    def _friendly_range(self, model: torch.nn.Module, images: Tensor, start: int, stop: int) -> np.ndarray:
        """Friendly noise of samples ``[start, stop)`` as int8, in batches aligned to ``batch_size``; ``model``
        maps [0, 1] pixels to logits."""
        device = getattr(model, "device", None)  # a LightningModule's; a pixel-space wrapper's parameters'
        if device is None:
            device = next(model.parameters()).device
        out = []
        for first in range(start, stop, self.batch_size):
            last = min(first + self.batch_size, stop)
            x = images[first:last].to(device, torch.float32)
            eps = generate_friendly_noise(
                model, x, torch.arange(first, last), zeta=self.zeta, steps=self.steps, lr=self.lr, lam=self.lam,
                init_eps=self.init_eps, seed=self.seed, loss_scale=float(self.batch_size),
            )
            out.append(_quantize(eps, self.zeta).cpu().numpy())
        return np.concatenate(out)


def _read_chunks(cache: ChunkCache) -> Tensor:
    return torch.from_numpy(cache.load().raw())


def _read_noise_file(path: Union[str, Path]) -> tuple[Tensor, float]:
    """``(int8 noise, zeta)`` from a file written by :meth:`FriendsNoise.save`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != _FILE_FORMAT or "friendly_noise" not in f.keys():
                raise ValueError(f"{str(path)!r} is not a FriendsNoise file (format {_FILE_FORMAT!r} with key 'friendly_noise')")
            noise = f.get_tensor("friendly_noise")
    except SafetensorError as err:
        raise CorruptStoreError(
            f"the friendly noise file {str(path)!r} cannot be read as safetensors ({err}): it is truncated or damaged. "
            "Copy the original back, or write it again with FriendsNoise.save() (save_file=)"
        ) from err
    if noise.dtype != torch.int8 or noise.ndim != 4:
        raise ValueError(f"{str(path)!r}: friendly_noise must be int8 (N, C, H, W); got {noise.dtype} {tuple(noise.shape)}")
    return noise, float(metadata["zeta"])


def _read_source(source: dict[str, Any]) -> Tensor:
    """The int8 noise a checkpoint's reference points to (raises FileNotFoundError when it is gone)."""
    path = Path(source["path"])
    if source["kind"] == "file":
        if not path.is_file():
            raise FileNotFoundError(f"no file {str(path)!r}")
        return _read_noise_file(path)[0]
    cache = ChunkCache(path, source["num_samples"], tuple(source["sample_shape"]), "int8", source["chunk_size"])
    missing = cache.missing()
    if not cache.is_complete() or missing:
        raise FileNotFoundError(f"{str(path)!r} lacks its manifest or chunks {missing}")
    return _read_chunks(cache)


def _train_dataset(trainer: L.Trainer) -> Optional[Dataset]:
    datamodule = trainer.datamodule
    dataset = getattr(datamodule, "train_set", None) if datamodule is not None else None
    if dataset is None:
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
    return dataset

"""FRIENDS: friendly noise plus random noise on every training batch (Liu, Mirzasoleiman et al., 2022).

"Friendly Noise against Adversarial Noise: A Powerful Defense against Data Poisoning Attacks".
Algorithm 1 finds, once, the largest per-sample perturbation ``eps_i`` within ``+-zeta`` that keeps the
model's prediction (small KL divergence); Algorithm 2 then trains on ``x_i + eps_i + mu`` with fresh
random noise ``mu`` at every iteration.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_defense.datamodules._base import unpack_batch

NOISE_TYPES = ("bernoulli", "uniform", "gaussian")
_FILE_FORMAT = "friends-int8-v1"
_LEVELS = 127  # int8 storage: friendly noise in units of zeta / 127


def per_sample_uniform(seed: int, indices: Tensor, shape: tuple[int, ...], bound: float) -> Tensor:
    """U(-bound, bound) noise for each sample index, from a stream keyed by ``(seed, index)``.

    The draw of a sample depends only on the seed and its index, so generation split across any number
    of processes starts from the same ``eps^0``.
    """
    out = np.empty((len(indices), *shape), dtype=np.float32)
    for row, index in enumerate(indices.tolist()):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(index), 0xF1E])))
        out[row] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
    return torch.from_numpy(out)


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


class FriendsNoise(Callback):
    """FRIENDS (Liu et al., 2022): friendly noise from ``begin_epoch`` on, random noise throughout.

    * Before ``begin_epoch`` every training batch gets random noise only (the paper's first 5 epochs).
    * At the start of ``begin_epoch`` the current model, in eval mode, generates friendly noise for every
      training sample (Algorithm 1, :func:`generate_friendly_noise`) over the training set, without
      shuffling or augmentation. Under DDP the batches are split across the ranks and gathered, so every
      rank holds all of it, stored as int8 in units of ``zeta / 127``.
    * From then on each batch gets its samples' friendly noise (looked up by index) plus fresh random
      noise, in [0, 1] pixel space, clamped to [0, 1] (Algorithm 2). This happens in
      ``on_train_batch_start``, before the model's augmentation and normalisation.

    The noise is saved in the checkpoint (``state_dict``), so a resumed run neither regenerates nor loses
    it; :meth:`save` / ``noise_file`` move it to another run or architecture (the paper's transfer).

    Batches must be ``(images, labels, indices)``; the LightningModule's ``forward`` must take images in
    [0, 1] (``ImageClassifier`` does).

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

    Raises:
        ValueError: On an argument out of range or an unknown ``noise_type``.

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
        self._noise: Optional[Tensor] = None  # int8 (N, C, H, W) on the CPU, units of zeta / 127
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
        return {"friendly_noise": self._noise, "zeta": self.zeta}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        noise = state_dict.get("friendly_noise")
        if noise is not None:
            self._check_zeta(state_dict.get("zeta", self.zeta), "the checkpoint")
            self._set_noise(noise)

    def save(self, path: Union[str, Path]) -> None:
        """Write the friendly noise to a ``.safetensors`` file (atomically), for ``noise_file=``."""
        from safetensors.torch import save_file

        if self._noise is None:
            raise RuntimeError("FriendsNoise.save: no friendly noise yet (it is generated at begin_epoch)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"friendly_noise": self._noise.contiguous()}, str(tmp), metadata={"format": _FILE_FORMAT, "zeta": repr(self.zeta)})
        os.replace(tmp, path)

    def load(self, path: Union[str, Path]) -> None:
        """Read friendly noise written by :meth:`save` (possibly by another architecture's run)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != _FILE_FORMAT or "friendly_noise" not in f.keys():
                raise ValueError(f"{str(path)!r} is not a FriendsNoise file (format {_FILE_FORMAT!r} with key 'friendly_noise')")
            noise = f.get_tensor("friendly_noise")
        self._check_zeta(float(metadata["zeta"]), repr(str(path)))
        if noise.dtype != torch.int8 or noise.ndim != 4:
            raise ValueError(f"{str(path)!r}: friendly_noise must be int8 (N, C, H, W); got {noise.dtype} {tuple(noise.shape)}")
        self._set_noise(noise)

    def _check_zeta(self, zeta: float, source: str) -> None:
        if not math.isclose(zeta, self.zeta, rel_tol=1e-6):
            raise ValueError(f"the friendly noise in {source} was generated with zeta={zeta}; this FriendsNoise has zeta={self.zeta}")

    def _set_noise(self, noise: Tensor) -> None:
        self._noise = noise.to("cpu", torch.int8).contiguous()
        self._noise_on_device = None

    # ---------------------------------------------------------------- hooks
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        self._generator = None  # reseeded lazily on the batch's device from (seed, epoch, rank)
        if epoch < self.begin_epoch:
            return
        dataset = _train_dataset(trainer)
        if self._noise is None:
            self._noise = self._generate(trainer, pl_module, dataset)
            self._noise_on_device = None
            if self.save_file is not None:
                if trainer.global_rank == 0:
                    self.save(self.save_file)
                trainer.strategy.barrier("FriendsNoise.save")
        if dataset is not None and len(dataset) != len(self._noise):
            raise ValueError(
                f"FriendsNoise holds friendly noise for {len(self._noise)} samples but the training set has "
                f"{len(dataset)}; the noise must come from this training set (noise_file / checkpoint mismatch)"
            )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        x, _, indices = unpack_batch(batch)
        if indices is None:
            raise ValueError(
                "FriendsNoise needs each training batch as (images, labels, indices) to look up each sample's "
                "friendly noise; got (images, labels). Wrap your dataset in "
                "lightning_defense.datamodules.IndexedDataset or return (image, label, index) from __getitem__."
            )
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
            state = np.random.SeedSequence([self.seed, trainer.current_epoch, trainer.global_rank]).generate_state(1)
            self._generator = torch.Generator(device=x.device).manual_seed(int(state[0]))
        mu = self.noise_eps
        if self.noise_type == "bernoulli":
            signs = torch.rand(x.shape, generator=self._generator, device=x.device, dtype=x.dtype) < 0.5
            return signs.to(x.dtype).mul_(2 * mu).sub_(mu)
        if self.noise_type == "uniform":
            return torch.rand(x.shape, generator=self._generator, device=x.device, dtype=x.dtype).mul_(2 * mu).sub_(mu)
        return torch.randn(x.shape, generator=self._generator, device=x.device, dtype=x.dtype).mul_(mu)

    def _generate(self, trainer: L.Trainer, pl_module: L.LightningModule, dataset: Optional[Dataset]) -> Tensor:
        """Run Algorithm 1 over the training set; batches ``b = rank, rank + world, ...`` on each rank."""
        if dataset is None:
            raise RuntimeError(
                "FriendsNoise could not find the training set: give the datamodule a train_set attribute "
                "or train from a DataLoader whose .dataset yields (image, label, index)"
            )
        from tqdm.auto import tqdm

        n, world, rank = len(dataset), trainer.world_size, trainer.global_rank
        num_batches = math.ceil(n / self.batch_size)
        mine = [b for b in range(num_batches) if b % world == rank]
        positions = [i for b in mine for i in range(b * self.batch_size, min((b + 1) * self.batch_size, n))]
        loader = DataLoader(Subset(dataset, positions), batch_size=self.batch_size, shuffle=False)
        rank_zero_info(f"FriendsNoise: generating friendly noise for {n} samples at epoch {trainer.current_epoch}")
        was_training = pl_module.training
        pl_module.eval()
        chunks = []
        try:
            offset = 0
            for batch in tqdm(loader, desc="FRIENDS friendly noise", disable=rank != 0):
                x, _, _ = unpack_batch(batch)
                x = x.to(pl_module.device, torch.float32)
                idx = torch.as_tensor(positions[offset : offset + len(x)])
                offset += len(x)
                eps = generate_friendly_noise(
                    pl_module, x, idx, zeta=self.zeta, steps=self.steps, lr=self.lr, lam=self.lam,
                    init_eps=self.init_eps, seed=self.seed, loss_scale=float(self.batch_size),
                )
                chunks.append(_quantize(eps, self.zeta))
        finally:
            pl_module.train(was_training)
        sample_shape = tuple(chunks[0].shape[1:]) if chunks else tuple(dataset[0][0].shape)
        local = torch.cat(chunks) if chunks else torch.zeros((0, *sample_shape), dtype=torch.int8, device=pl_module.device)
        if world == 1:
            return local.cpu()
        per_rank = math.ceil(num_batches / world) * self.batch_size
        padded = torch.zeros((per_rank, *sample_shape), dtype=torch.int8, device=local.device)
        padded[: len(local)] = local
        gathered = trainer.strategy.all_gather(padded)  # (world, per_rank, C, H, W)
        # row j * batch_size + k of rank r is sample (j * world + r) * batch_size + k
        ordered = gathered.view(world, -1, self.batch_size, *sample_shape).transpose(0, 1)
        return ordered.reshape(-1, *sample_shape)[:n].cpu().contiguous()


def _train_dataset(trainer: L.Trainer) -> Optional[Dataset]:
    datamodule = trainer.datamodule
    dataset = getattr(datamodule, "train_set", None) if datamodule is not None else None
    if dataset is None:
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
    return dataset

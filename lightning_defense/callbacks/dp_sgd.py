"""DP-SGD for any LightningModule through Opacus: per-sample clipping, Gaussian noise, Poisson sampling.

Differential privacy bounds how much any one training sample can change the model (Ma et al. 2019;
the survey's DP-SGD section), which limits what a few poisons can do. Hong et al. compare against
(1.0, 0.05)-DP training in their Table 5.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_defense.core.collective import Collective
from lightning_defense.core.rng import generator
from lightning_defense.core.seam import SAMPLER, TrainingDataSeam

_NOISE, _SAMPLER, _WORKERS = "noise", "sampler", "workers"  # DP-SGD's streams (workers: DataLoader seeds)
_WORKER_SEEDS, _RESUMED = 0xD15, 0x5E5  # purpose keys of the worker-seed stream and of streams new on resume


class DPSGD(L.Callback):
    """Makes a LightningModule's training differentially private with Opacus.

    The callback attaches Opacus' per-sample gradient hooks to the module in ``setup``, turns the
    training loader into Opacus' Poisson-sampled ``DPDataLoader`` (a ``SAMPLER`` transform on the
    :class:`~lightning_defense.core.seam.TrainingDataSeam`), and wraps the optimizer in Opacus' ``DPOptimizer``
    (``DistributedDPOptimizer`` under DDP, where the noise is added once, on rank 0, and the
    clipped-and-noised gradients are averaged over ranks). The privacy spent so far, epsilon at
    ``delta``, is logged as ``dp/epsilon`` after every epoch. It assumes one optimizer, automatic
    optimisation, and a loss averaged over the batch. Batches may be ``(x, y)``, ``(x, y, index)`` or dicts, of
    normalised or raw images: DP-SGD acts on gradients, not pixels. A Poisson batch may be empty; it keeps the
    user's batch structure with zero samples (:class:`EmptyBatchCollate`).

    The random streams (the noise, the Poisson sampler and the loader's worker seeds) are made once per
    callback and saved in the checkpoint, every rank's: a fit resumed from an end-of-epoch checkpoint sees
    exactly the batches and noise of an uninterrupted fit (from a mid-epoch one the streams still go on).
    Restarting them would reuse noise that can cancel between updates and spend privacy the accountant
    does not count. A checkpoint without these states, or a resumed fit with more processes, gets new
    streams keyed by the resumed step, with a warning.

    **Seeds and privacy.** With the default ``secure_mode=False`` the noise and the batches come from a
    PyTorch pseudo-random generator seeded from ``seed``: anyone who knows the seed (it is in the
    config) can regenerate the noise and subtract it from the released model's updates, which voids the
    guarantee. Fine for experiments and reproducible tables; for a real deployment pass
    ``secure_mode=True``, Opacus' secure mode: noise and batches from a cryptographically secure
    generator (``torchcsprng``, reading ``/dev/urandom``), no seed, noise sampled so that it resists
    floating-point attacks, and no reproducibility.

    Args:
        noise_multiplier: Std of the Gaussian noise relative to ``max_grad_norm``.
        max_grad_norm: Per-sample gradient clipping bound C.
        delta: The delta at which epsilon is reported.
        poisson_sampling: Sample each batch by including every sample with probability
            batch_size / N (what the accountant assumes). Under DDP this needs
            ``Trainer(use_distributed_sampler=False)``: the Poisson sampler shards the data itself.
        replace_batchnorm: Replace layers Opacus cannot handle (BatchNorm) with GroupNorm.
            Without it such layers are a clear error.
        seed: Seed of the DP noise and of the Poisson sampler (whose stream is keyed by seed and global rank);
            None means 0. Refused with ``secure_mode=True``, as in Opacus.
        secure_mode: Opacus' secure mode (see above); needs ``torchcsprng`` and ``poisson_sampling=True``.

    Raises:
        ValueError: on a bad argument, or on layers Opacus cannot train privately.
        ImportError: ``secure_mode=True`` without ``torchcsprng`` installed.

    Example::

        trainer = L.Trainer(callbacks=[DPSGD(noise_multiplier=1.0, max_grad_norm=1.0)])
    """

    def __init__(
        self,
        noise_multiplier: float = 1.0,
        max_grad_norm: float = 1.0,
        delta: float = 1e-5,
        poisson_sampling: bool = True,
        replace_batchnorm: bool = False,
        seed: Optional[int] = None,
        secure_mode: bool = False,
    ) -> None:
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0; got {noise_multiplier}")
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0; got {max_grad_norm}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1); got {delta}")
        if secure_mode and seed is not None:
            raise ValueError(
                f"DPSGD(secure_mode=True) takes no seed (got seed={seed}): secure mode draws the noise and batches "
                "from a cryptographically secure generator, and a seed would make them reproducible by anyone "
                "who knows it (Opacus: 'Passing seed is prohibited in secure mode'). Drop seed, or use "
                "secure_mode=False for reproducible experiments"
            )
        if secure_mode and not poisson_sampling:
            raise ValueError("DPSGD(secure_mode=True) needs poisson_sampling=True: the guarantee it hardens "
                             "assumes Poisson-sampled batches")
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.delta = delta
        self.poisson_sampling = poisson_sampling
        self.replace_batchnorm = replace_batchnorm
        self.secure_mode = bool(secure_mode)
        self.seed = None if secure_mode else int(seed or 0)
        self._secure_rng = _secure_generator() if secure_mode else None
        self._accountant = None
        self._grad_sample_module = None
        self._sample_rate: Optional[float] = None
        self._trainer: Optional[L.Trainer] = None
        self._generators: dict[str, torch.Generator] = {}  # this rank's streams, made once per callback
        self._saved_generators: Optional[list] = None  # every rank's stream states, from a checkpoint
        self._warned_new_streams = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm)

    @contextmanager
    def capture_paused(self) -> Iterator[None]:
        """Opacus' per-sample gradient capture off for the block: a defense's own passes (PGD's attack,
        FRIENDS' noise) are not training steps and must not leave activations or per-sample gradients."""
        module = self._grad_sample_module
        if module is None or not module.hooks_enabled:
            yield
            return
        module.disable_hooks()
        try:
            yield
        finally:
            module.enable_hooks()

    @property
    def epsilon(self) -> float:
        """Privacy spent so far, at ``delta`` (0.0 before the first step)."""
        if self._accountant is None or not self._accountant.history:
            return 0.0
        return float(self._accountant.get_epsilon(delta=self.delta))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from opacus import GradSampleModule
        from opacus.accountants import RDPAccountant

        self._trainer = trainer
        self._make_compatible(pl_module)
        self._grad_sample_module = GradSampleModule(pl_module, loss_reduction="mean", strict=True)
        if self._accountant is None:
            self._accountant = RDPAccountant()
        self._patch_train_loader(trainer)

    def _make_compatible(self, pl_module: nn.Module) -> None:
        from opacus.validators import ModuleValidator

        for module in pl_module.modules():  # in-place activations break Opacus' backward hooks
            if isinstance(getattr(module, "inplace", None), bool):
                module.inplace = False
        errors = ModuleValidator.validate(pl_module.train(), strict=False)
        if not errors:
            return
        if not self.replace_batchnorm:
            listed = "; ".join(sorted({str(e) for e in errors})[:5])
            raise ValueError(
                f"DPSGD: Opacus cannot compute per-sample gradients for this model ({listed}). Pass "
                "DPSGD(replace_batchnorm=True) to swap BatchNorm for GroupNorm, or build the model with "
                "GroupNorm (e.g. ImageClassifier(backbone_kwargs={'norm': 'group'}))"
            )
        for name, child in list(pl_module.named_children()):
            if ModuleValidator.validate(child, strict=False):
                setattr(pl_module, name, ModuleValidator.fix(child))
        remaining = ModuleValidator.validate(pl_module, strict=False)
        if remaining:
            raise ValueError(f"DPSGD: layers remain that Opacus cannot handle after replacement: {remaining[:3]}")
        rank_zero_info("DPSGD: replaced BatchNorm layers with GroupNorm")

    def _patch_train_loader(self, trainer: L.Trainer) -> None:
        distributed = trainer.world_size > 1
        if distributed and self.poisson_sampling and trainer._accelerator_connector.use_distributed_sampler:
            raise ValueError(
                "DPSGD with poisson_sampling=True under DDP needs Trainer(use_distributed_sampler=False): "
                "the Poisson sampler shards the data across ranks itself"
            )

        def private_loader(loader: DataLoader, is_train: bool) -> DataLoader:
            if not is_train:
                return loader
            if not self.poisson_sampling:
                batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
                if batch_size is None:
                    raise ValueError("DPSGD(poisson_sampling=False) needs a training loader with a batch_size (the "
                                     "accountant's sample rate is batch_size / N); use poisson_sampling=True")
                self._sample_rate = batch_size / len(loader.dataset)
                return loader
            from opacus.data_loader import DPDataLoader

            dp_loader = DPDataLoader.from_data_loader(
                loader, distributed=distributed, generator=self._stream(_SAMPLER, trainer, "cpu", trainer.global_rank)
            )
            self._sample_rate = dp_loader.sample_rate
            # Opacus seeds the loader's workers from the sampler's generator: one draw per iterator, and
            # Lightning makes more iterators when it rebuilds the loader. Their own stream keeps the batches
            # a function of (seed, rank, batches drawn) alone.
            dp_loader.generator = self._stream(_WORKERS, trainer, "cpu", trainer.global_rank, _WORKER_SEEDS)
            dp_loader.collate_fn = EmptyBatchCollate(loader.collate_fn, loader.dataset)
            return dp_loader

        TrainingDataSeam.of(trainer).add("DPSGD", private_loader, SAMPLER)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

        if len(trainer.optimizers) != 1:
            raise ValueError(f"DPSGD supports exactly one optimizer; the module configures {len(trainer.optimizers)}")
        optimizer = trainer.optimizers[0]
        if isinstance(optimizer, DPOptimizer):
            return
        loader = trainer.train_dataloader
        per_rank_samples = len(loader.dataset) / (trainer.world_size if self.poisson_sampling else 1)
        expected_batch_size = max(1, round(self._sample_rate * per_rank_samples))
        optimizer_cls = DistributedDPOptimizer if trainer.world_size > 1 else DPOptimizer
        private = optimizer_cls(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=self._stream(_NOISE, trainer, pl_module.device),
            secure_mode=self.secure_mode,
        )
        private.attach_step_hook(self._accountant.get_optimizer_hook_fn(sample_rate=self._sample_rate))
        trainer.optimizers = [private]

    def _stream(self, name: str, trainer: L.Trainer, device: Any, *keys: int) -> torch.Generator:
        """This rank's stream ``name`` on ``device``: keyed by ``(seed, *keys)``, made once per callback and
        continued from the checkpoint's state on resume (the secure generator in secure mode)."""
        if self.secure_mode:
            return self._secure_rng
        device = torch.device(device)
        existing = self._generators.get(name)
        if existing is not None and existing.device.type == device.type:
            return existing  # e.g. a training loader rebuilt every epoch: the stream goes on
        stream = generator(self.seed, *keys, device=device)
        if self._saved_generators is not None:  # resuming
            saved = self._saved_generators[trainer.global_rank] if trainer.global_rank < len(self._saved_generators) else {}
            state = saved.get(name)
            if state is not None and state["device"] == device.type:
                stream.set_state(state["state"])
            else:
                if not self._warned_new_streams:  # per rank: the missing states may be another rank's
                    warnings.warn(
                        f"DPSGD: the checkpoint holds no {name} stream state for rank {trainer.global_rank} on "
                        f"{device.type} (a checkpoint from before these were saved, more processes, or another "
                        f"device); starting new streams keyed by the resumed step {trainer.global_step}, so that no "
                        "noise or batch is replayed"
                    )
                    self._warned_new_streams = True
                stream = generator(self.seed, *keys, trainer.global_step, _RESUMED, device=device)
        self._generators[name] = stream
        return stream

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("dp/epsilon", self.epsilon, prog_bar=True, sync_dist=False)

    def state_dict(self) -> dict[str, Any]:
        """The accountant's history and every rank's noise and sampler stream states (gathered on rank 0;
        Lightning builds a checkpoint on every rank)."""
        state: dict[str, Any] = {"history": list(self._accountant.history) if self._accountant else []}
        if self.secure_mode or not self._generators:
            return state
        mine = {name: {"device": g.device.type, "state": g.get_state()} for name, g in self._generators.items()}
        everyone = Collective.of(self._trainer).gather(mine)
        state["generators"] = everyone if everyone is not None else [mine]  # rank 0's copy is the one written
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from opacus.accountants import RDPAccountant

        self._accountant = RDPAccountant()
        self._accountant.history = [tuple(h) for h in state_dict.get("history", [])]
        self._generators = {}
        self._saved_generators = list(state_dict.get("generators") or [])
        self._warned_new_streams = False


class EmptyBatchCollate:
    """``collate_fn`` for Poisson-sampled batches, some of which are empty: an empty batch has the structure of
    the user's batches (tuple, dict, ...) with zero samples.

    The structure is learnt from the first non-empty batch, or, when the very first batch is empty, from
    ``dataset[0]`` (read with the global random state restored, so a random transform draws nothing). Opacus'
    own wrapper builds such a first batch as a list of tensors shaped after ``dataset[0]``'s fields, which
    breaks dict samples (a dict iterates over its keys).
    """

    def __init__(self, collate_fn: Callable, dataset: Dataset) -> None:
        self.collate_fn, self.dataset = collate_fn, dataset
        self._empty: Any = None

    def __call__(self, samples: list) -> Any:
        if samples:
            batch = self.collate_fn(samples)
            if self._empty is None:
                self._empty = _no_samples(batch)
            return batch
        if self._empty is None:
            with torch.random.fork_rng(devices=[]):
                self._empty = _no_samples(self.collate_fn([self.dataset[0]]))
        return self._empty

def _no_samples(batch: Any) -> Any:
    """``batch`` (of one sample) with zero samples: tensors cut to length 0 along the batch dimension."""
    if isinstance(batch, Tensor):
        return batch[:0].clone()
    if isinstance(batch, Mapping):
        return {key: _no_samples(value) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        if batch and all(isinstance(v, (str, bytes, int, float, bool)) for v in batch):
            return type(batch)()  # per-sample values collated into a list (e.g. file names)
        fields = [_no_samples(value) for value in batch]
        return type(batch)(*fields) if hasattr(batch, "_fields") else type(batch)(fields)
    raise TypeError(
        f"DPSGD: an empty Poisson batch cannot be built for a batch field of type {type(batch).__name__}; the "
        "collate_fn must return tensors, dicts, lists or tuples of them"
    )


def _secure_generator() -> torch.Generator:
    """Opacus' secure-mode generator: ``torchcsprng`` reading ``/dev/urandom``."""
    try:
        import torchcsprng
    except ImportError as error:
        raise ImportError(
            "DPSGD(secure_mode=True) needs the torchcsprng package (a cryptographically secure generator, as "
            "Opacus' secure mode); install it, or use secure_mode=False for experiments"
        ) from error
    return torchcsprng.create_random_device_generator("/dev/urandom")

"""A fast training recipe in the style of airbench94 (Jordan, 2024): a patch-whitening network and its recipe.

Hong et al. train each of their CIFAR-10 models in about 15 s on an A100; airbench94 reaches 94% in 3.09 s.
The pieces, each a small object here:

* :class:`~lightning_defense.models.airbench.AirbenchNet` (backbone ``"airbench"``): a 2x2 convolution whose
  filters are the eigenvectors of the training patches' (uncentred) covariance scaled by
  ``1/sqrt(eigenvalue + eps)`` (and their negatives), then conv groups of ``conv -> max-pool -> BN -> GELU ->
  conv -> BN -> GELU`` (identity-initialised convolutions, BatchNorm with a fixed unit scale), a global max-pool
  and a scaled linear head.
* :class:`Lookahead`: an optimizer wrapper; every ``every`` steps the slow weights move toward the fast ones,
  ``slow <- slow + (1 - decay) (fast - slow)``, and the fast weights restart from the slow ones.
* :class:`WarmupLinearDecay`: the per-step learning-rate factor, linear from ``start`` up to 1 over the
  warm-up, then linear down to ``end``.
* :func:`tta_logits`: test-time augmentation, the average of the logits of a mirrored and translated batch.
* :class:`FastImageClassifier`: :class:`~lightning_defense.models.ImageClassifier` with the above, label
  smoothing, and the whitening computed from the first training batch (remembered in a buffer, so a resumed
  fit does not redo it). The certification loop trains it as it trains ImageClassifier, several models at once,
  through the recipe's hooks (``criterion``, ``optimizer_and_schedule``, ``initialise_from_batch``,
  ``eval_logits``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_defense.core.batch import unpack_batch
from lightning_defense.core.collective import Collective
from lightning_defense.models.classifier import ImageClassifier

__all__ = ["FastImageClassifier", "Lookahead", "TTA_MODES", "WarmupLinearDecay", "tta_logits"]

#: Test-time augmentations of :func:`tta_logits`.
TTA_MODES = ("none", "flip", "translate", "flip_translate")


# --------------------------------------------------------------------------- the recipe


class WarmupLinearDecay:
    """The learning-rate factor at step ``t`` (for ``LambdaLR``): linear from ``start`` to 1 over the first
    ``warmup`` of ``total`` steps, then linear to ``end`` at step ``total`` (and ``end`` after it).

    A class rather than a closure, so the scheduler's ``state_dict`` holds it.
    """

    def __init__(self, total: int, warmup: float = 0.23, start: float = 0.2, end: float = 0.07) -> None:
        if not isinstance(total, int) or total < 1:
            raise ValueError(f"total must be the number of optimizer steps, an int >= 1; got {total!r}")
        self.total, self.warmup, self.start, self.end = total, float(warmup), float(start), float(end)
        self.warmup_steps = int(total * warmup)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            frac = step / self.warmup_steps
            return self.start + (1 - self.start) * frac
        frac = min(1.0, (step - self.warmup_steps) / max(1, self.total - self.warmup_steps))
        return 1 + (self.end - 1) * frac


class Lookahead(Optimizer):
    """Lookahead around any optimizer: every ``every`` steps ``slow <- slow + (1 - decay_t) * (fast - slow)`` and
    the fast weights (the parameters) restart from ``slow``.

    ``decay_t`` ramps as airbench94's does, ``decay * (t / total_steps) ** 3`` (the slow weights follow the fast
    ones early and average late), and at step ``total_steps`` the parameters become the slow weights
    (``decay_t = 1``). With ``total_steps=None`` the decay is ``decay`` throughout (Zhang et al.'s Lookahead
    with ``alpha = 1 - decay``). The slow weights live in the optimizer state (key ``"lookahead"``) and the
    step count in each parameter group (``"lookahead_step"``), so ``state_dict`` / ``load_state_dict`` resume
    it. Only parameters are averaged (BatchNorm's running statistics are buffers, outside any optimizer).

    Args:
        optimizer: The inner optimizer; it shares its parameter groups and state with the wrapper, so a
            scheduler built on the wrapper drives it.
        every: Steps between syncs (airbench94: 5).
        decay: The slow weights' decay per sync (airbench94: ``0.95 ** 5``), in [0, 1].
        total_steps: The fit's optimizer steps, for the ramp and the final copy; None: a constant decay.

    Example::

        optimizer = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), every=5, total_steps=1000)
    """

    def __init__(self, optimizer: Optimizer, every: int = 5, decay: float = 0.95**5,
                 total_steps: Optional[int] = None) -> None:
        if not isinstance(optimizer, Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1 (steps between syncs; airbench94: 5); got {every!r}")
        if not 0 <= decay <= 1:
            raise ValueError(f"decay must be in [0, 1] (airbench94: 0.95**5); got {decay}")
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(f"total_steps must be an int >= 1 or None; got {total_steps!r}")
        self.optimizer = optimizer
        self.every, self.decay, self.total_steps = every, float(decay), total_steps
        # the base class builds its own list over the SAME group dicts: a scheduler on the wrapper sets their lr
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.state = optimizer.state
        for group in self.param_groups:
            group.setdefault("lookahead_step", 0)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "optimizer": self.optimizer, "every": self.every, "decay": self.decay,
                "total_steps": self.total_steps}

    def decay_at(self, step: int) -> float:
        """The decay of the sync after optimizer step ``step`` (1 at ``total_steps``: the fit ends on the slow weights)."""
        if self.total_steps is None:
            return self.decay
        if step == self.total_steps:
            return 1.0
        return self.decay * min(1.0, step / self.total_steps) ** 3

    @torch.no_grad()
    def sync(self, decay: float) -> None:
        """``slow <- slow + (1 - decay) (fast - slow)``, then ``fast <- slow``, for every parameter."""
        for group in self.param_groups:
            for p in group["params"]:
                slow = self.state[p]["lookahead"]
                slow.lerp_(p, 1 - decay)
                p.copy_(slow)

    def step(self, closure: Optional[Callable[[], float]] = None):
        with torch.no_grad():  # the slow weights start from the weights before the first step
            for group in self.param_groups:
                for p in group["params"]:
                    if "lookahead" not in self.state[p]:
                        self.state[p]["lookahead"] = p.detach().clone()
        loss = self.optimizer.step(closure)
        step = self.param_groups[0]["lookahead_step"] + 1
        for group in self.param_groups:
            group["lookahead_step"] = step
        if step % self.every == 0 or step == self.total_steps:
            self.sync(self.decay_at(step))
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)
        self.param_groups, self.state = self.optimizer.param_groups, self.optimizer.state

    def __repr__(self) -> str:
        return f"Lookahead(every={self.every}, decay={self.decay}, total_steps={self.total_steps}, {self.optimizer!r})"


def _shift(x: Tensor, dy: int, dx: int) -> Tensor:
    """``x`` (..., C, H, W) translated by (dy, dx) pixels, reflecting at the border."""
    pad = max(abs(dy), abs(dx))
    padded = F.pad(x.reshape(-1, *x.shape[-3:]), (pad,) * 4, mode="reflect")
    h, w = x.shape[-2:]
    return padded[..., pad - dy: pad - dy + h, pad - dx: pad - dx + w].reshape(x.shape)


def tta_logits(model: Callable[[Tensor], Tensor], x: Tensor, mode: str) -> Tensor:
    """Logits of ``model`` averaged over test-time augmentations of ``x``.

    ``"flip"``: ``(f(x) + f(mirror x)) / 2``. ``"translate"``: ``f(x) / 2 + (f(x shifted by (-1, -1)) + f(x shifted
    by (+1, +1))) / 4`` (reflected at the border). ``"flip_translate"``: the translate average of the flip average
    (airbench94's level 2: six views). ``"none"``: ``f(x)``.
    """
    if mode not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}; got {mode!r}")
    base = model
    if mode in ("flip", "flip_translate"):
        base = lambda v: 0.5 * (model(v) + model(v.flip(-1)))  # noqa: E731
    if mode in ("translate", "flip_translate"):
        return 0.5 * base(x) + 0.25 * (base(_shift(x, -1, -1)) + base(_shift(x, 1, 1)))
    return base(x)


class FastImageClassifier(ImageClassifier):
    """:class:`~lightning_defense.models.ImageClassifier` trained by an airbench94-style recipe.

    * Whitening: on the first training batch (before augmentation),
      :meth:`~lightning_defense.models.airbench.AirbenchNet.init_whitening` sets the stem from that batch, once;
      the backbone's ``whitened`` buffer records it (a resumed fit, or a module loaded from a checkpoint, does
      not redo it). Under DDP rank 0 computes the filters and broadcasts them.
    * Label smoothing ``label_smoothing`` in the cross-entropy.
    * SGD with Nesterov momentum; BatchNorm biases at ``bias_scaler`` times the learning rate (and
      ``1/bias_scaler`` the weight decay, so every weight decays by ``lr * weight_decay`` per step).
    * :class:`Lookahead` every ``lookahead_every`` steps (0: off), ramped and ending on the slow weights.
    * :class:`WarmupLinearDecay` per optimizer step (a ``LambdaLR`` with ``"interval": "step"``).
    * Test-time augmentation ``tta`` in eval mode (:func:`tta_logits`), so validation, test and the
      certification loop's votes all use it.
    * Training augmentation: ImageClassifier's keyed random crop (``crop_padding``) and flip.

    The schedule needs the number of optimizer steps: ``total_steps`` where given, else the Trainer's
    ``estimated_stepping_batches``, or the certification loop's count (``max_epochs`` times the batches per
    epoch).

    Args:
        backbone: ``"airbench"`` (:class:`~lightning_defense.models.airbench.AirbenchNet`, ``backbone_kwargs`` for
            its widths) or any backbone of ImageClassifier (then ``whiten`` must be False).
        lr: SGD learning rate of the mean loss at the peak of the schedule.
        momentum, weight_decay: SGD's (Nesterov momentum).
        label_smoothing: In [0, 1).
        bias_scaler: Learning-rate multiple of the BatchNorm biases (airbench94: 64).
        lookahead_every: Steps between lookahead syncs (0 disables lookahead).
        lookahead_decay: The slow weights' decay per sync at the end of the ramp.
        warmup, start_factor, end_factor: The schedule (:class:`WarmupLinearDecay`).
        tta: One of :data:`TTA_MODES`; None: ``"flip_translate"`` when ``flip`` is on, else ``"translate"``.
        whiten: Initialise the stem from the first training batch.
        total_steps: Optimizer steps of the fit where no Trainer says it.
        Others: As :class:`~lightning_defense.models.ImageClassifier` (``milestones``/``gamma`` are not used:
            the schedule is per step).

    Example::

        model = FastImageClassifier(num_classes=10, in_chans=1, backbone_kwargs={"widths": [32, 64, 128]})
        L.Trainer(max_epochs=4).fit(model, datamodule=FashionMNISTDataModule())
    """

    def __init__(
        self,
        backbone: Union[str, nn.Module] = "airbench",
        num_classes: int = 10,
        in_chans: int = 3,
        mean: Union[float, Sequence[float]] = 0.5,
        std: Union[float, Sequence[float]] = 0.5,
        lr: float = 0.4,
        momentum: float = 0.85,
        nesterov: bool = True,
        weight_decay: float = 1.25e-3,
        label_smoothing: float = 0.2,
        bias_scaler: float = 64.0,
        lookahead_every: int = 5,
        lookahead_decay: float = 0.95**5,
        warmup: float = 0.23,
        start_factor: float = 0.2,
        end_factor: float = 0.07,
        tta: Optional[str] = None,
        whiten: bool = True,
        total_steps: Optional[int] = None,
        crop_padding: int = 2,
        flip: bool = True,
        backbone_kwargs: Optional[dict] = None,
        augment_seed: Optional[int] = None,
    ) -> None:
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1) (airbench94: 0.2); got {label_smoothing}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1) (airbench94: 0.85); got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0; got {weight_decay}")
        if not bias_scaler > 0:
            raise ValueError(f"bias_scaler must be > 0 (1 disables it; airbench94: 64); got {bias_scaler}")
        if not isinstance(lookahead_every, int) or lookahead_every < 0:
            raise ValueError(f"lookahead_every must be an int >= 0 (0 disables lookahead; airbench94: 5); got "
                             f"{lookahead_every!r}")
        if not 0 <= lookahead_decay <= 1:
            raise ValueError(f"lookahead_decay must be in [0, 1] (airbench94: 0.95**5 = 0.774); got {lookahead_decay}")
        if not 0 <= warmup < 1:
            raise ValueError(f"warmup must be a fraction of the steps in [0, 1) (airbench94: 0.23); got {warmup}")
        if not (start_factor >= 0 and end_factor >= 0):
            raise ValueError(f"start_factor and end_factor must be >= 0; got {start_factor}, {end_factor}")
        if tta is not None and tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {TTA_MODES} or None (follow flip); got {tta!r}")
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(f"total_steps must be an int >= 1 (optimizer steps of the whole fit) or None; got "
                             f"{total_steps!r}")
        super().__init__(backbone=backbone, num_classes=num_classes, in_chans=in_chans, mean=mean, std=std, lr=lr,
                         momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, crop_padding=crop_padding,
                         flip=flip, backbone_kwargs=backbone_kwargs, augment_seed=augment_seed)
        if whiten and not callable(getattr(self.backbone, "init_whitening", None)):
            raise ValueError(f"whiten=True needs a backbone with init_whitening (backbone='airbench'); "
                             f"{type(self.backbone).__name__} has none: set whiten=False")
        self.tta = tta if tta is not None else ("flip_translate" if flip else "translate")

    def forward(self, x: Tensor) -> Tensor:
        """Logits for un-normalised images in [0, 1]; averaged over ``tta`` in eval mode."""
        if self.training:
            return super().forward(x)
        return self.eval_logits(super().forward, x)

    def eval_logits(self, logits_of: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """The logits of ``logits_of`` averaged over the test-time augmentations ``tta`` of ``x`` (any leading dims)."""
        return tta_logits(logits_of, x, self.tta)

    def initialise_from_batch(self, x: Tensor) -> None:
        """Set the stem from the batch ``x`` (rank 0's under DDP), once."""
        backbone = self.backbone
        if not self.hparams.whiten or bool(backbone.whitened):
            return
        with torch.no_grad():
            backbone.init_whitening(self.normalize(x))
            collective = Collective.of(self._trainer)
            if collective.is_distributed:
                weight = collective.broadcast(backbone.stem.weight.detach().cpu(), 0)
                backbone.stem.weight.copy_(weight.to(backbone.stem.weight))

    def training_step(self, batch, batch_idx: int) -> Tensor:
        self.initialise_from_batch(unpack_batch(batch)[0])
        return super().training_step(batch, batch_idx)

    def criterion(self, logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        """Label-smoothed cross-entropy."""
        return F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing, reduction=reduction)

    def fit_steps(self, total_steps: Optional[int] = None) -> int:
        """The fit's optimizer steps: the hyperparameter ``total_steps``, else ``total_steps`` given here (the
        certification loop's count), else the Trainer's estimate."""
        if self.hparams.total_steps is not None:
            return int(self.hparams.total_steps)
        if total_steps is not None:
            return int(total_steps)
        trainer = self._trainer
        if trainer is None:
            raise ValueError(f"{type(self).__name__} needs total_steps (its schedule and lookahead are per step) "
                             "where no Trainer is attached, e.g. a user-module path of the certification loop: set "
                             "model.init_args.total_steps to max_epochs x training batches per epoch")
        steps = trainer.estimated_stepping_batches
        if not math.isfinite(steps) or steps < 1:
            raise ValueError(f"{type(self).__name__}'s schedule needs a finite number of steps; the Trainer gives "
                             f"{steps} (set max_epochs or max_steps, or total_steps)")
        return int(steps)

    def optimizer_and_schedule(self, max_epochs: int, total_steps: Optional[int] = None,
                               parameters: Optional[Mapping[str, Tensor]] = None,
                               modules: Optional[Mapping[str, nn.Module]] = None) -> tuple[Optimizer, LRScheduler, str]:
        """SGD (BatchNorm biases at ``bias_scaler`` times the lr), :class:`Lookahead`, and the per-step
        :class:`WarmupLinearDecay` over :meth:`fit_steps` steps (``"step"``). Arguments as
        :meth:`ImageClassifier.optimizer_and_schedule`; ``max_epochs`` is not used."""
        hp = self.hparams
        total = self.fit_steps(total_steps)
        named = dict(parameters) if parameters is not None else dict(self.named_parameters())
        modules = modules if modules is not None else dict(self.named_modules())
        bn_biases = {f"{name}.bias" for name, m in modules.items() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        biases = [p for n, p in named.items() if n in bn_biases and p.requires_grad]
        others = [p for n, p in named.items() if n not in bn_biases and p.requires_grad]
        groups = [{"params": others}]
        if biases:
            groups.append({"params": biases, "lr": hp.lr * hp.bias_scaler, "weight_decay": hp.weight_decay / hp.bias_scaler})
        optimizer: Optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum,
                                               nesterov=bool(hp.nesterov and hp.momentum > 0),
                                               weight_decay=hp.weight_decay)
        if hp.lookahead_every > 0:
            optimizer = Lookahead(optimizer, every=hp.lookahead_every, decay=hp.lookahead_decay, total_steps=total)
        schedule = WarmupLinearDecay(total, hp.warmup, hp.start_factor, hp.end_factor)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), "step"

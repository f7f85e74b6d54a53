"""PGD adversarial training (Madry et al. 2018), a baseline defense against poisoning (Geiping et al.
2021a; Hong et al. Table 5; ECLIPSE Table 1)."""

from __future__ import annotations

from typing import Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_defense.core.batch import require_pixel_range, unpack_batch
from lightning_defense.core import rng


def pgd_attack(
    model, x: Tensor, y: Tensor, eps: float, steps: int, step_size: float, generator: Optional[torch.Generator] = None
) -> Tensor:
    """l_inf PGD with a random start: maximise the cross-entropy of ``model`` within ``eps`` of ``x``.

    ``model`` takes un-normalised images in [0, 1]; the result stays in [0, 1].
    """
    delta = (torch.rand(x.shape, device=x.device, generator=generator) * 2 - 1) * eps
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step_size * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1).detach()


class AdversarialTraining(L.Callback):
    """Replaces every training batch by its PGD adversarial examples before the training step.

    The attack runs in ``on_train_batch_start`` on the un-normalised batch, with the model in eval
    mode (so BatchNorm statistics are not updated by the attack's forward passes); the model's own
    augmentation and normalisation follow in ``training_step``.
    Batches must hold un-normalised images in [0, 1] (anything else is a clear error, not a silent clamp).

    Args:
        eps: l_inf bound in [0, 1] pixel units (8/255 is the usual CIFAR-10 setting).
        steps: PGD steps.
        step_size: Step size; None uses 2.5 * eps / steps.
        seed: Seed of the random starts (one stream per seed and global rank).

    Example::

        trainer = L.Trainer(callbacks=[AdversarialTraining(eps=8/255, steps=7)])
    """

    def __init__(self, eps: float = 8 / 255, steps: int = 7, step_size: Optional[float] = None, seed: int = 0) -> None:
        if not 0 < eps <= 1:
            raise ValueError(f"eps must be in (0, 1] (pixel units, e.g. 8/255); got {eps}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1; got {steps}")
        if step_size is not None and step_size <= 0:
            raise ValueError(f"step_size must be > 0; got {step_size}")
        self.eps = eps
        self.steps = steps
        self.step_size = step_size if step_size is not None else 2.5 * eps / steps
        self.seed = seed
        self._generator: Optional[torch.Generator] = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._generator = rng.generator(self.seed, trainer.global_rank, device=pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        x, y, _ = unpack_batch(batch)
        require_pixel_range(x, "AdversarialTraining")
        pl_module.eval()
        try:
            with torch.enable_grad():
                x.copy_(pgd_attack(pl_module, x, y, self.eps, self.steps, self.step_size, self._generator))
        finally:
            pl_module.train()

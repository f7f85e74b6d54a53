"""EM: error-minimising noise, "unlearnable examples" (Huang et al., ICLR 2021).

A bi-level min-min problem: ``min_theta E[ min_delta L(f_theta(x + delta), y) ]``. The attacker alternates
``train_steps`` batches of training a small model on the perturbed data with ``perturb_steps`` steps of
projected gradient *descent* on each sample's delta, until the model reaches ``stop_accuracy`` on the
perturbed data. The noise makes the training loss small from the start, so the victim learns little.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_defense.attacks.base import AttackGoal, IndiscriminateAttack, check_split, project
from lightning_defense.core.device import autocast
from lightning_defense.datamodules.poison import PoisonSet
from lightning_defense.models.augment import random_crop_flip
from lightning_defense.models.classifier import ImageClassifier


class ErrorMinimizingNoise(IndiscriminateAttack):
    """Sample-wise error-minimising noise.

    Args:
        eps: l_inf (or l2) bound in [0, 1] pixel units (the paper: 8/255).
        norm: ``"linf"`` or ``"l2"``.
        budget: Fraction of the training set perturbed (1.0 in the paper).
        backbone: The crafting model (any :class:`ImageClassifier` backbone name).
        backbone_kwargs: Extra arguments of the backbone, e.g. ``{"width": 16}``.
        train_steps: Model-training batches per outer round (the paper: 10).
        perturb_steps: PGD steps on delta per batch (the paper: 20 on CIFAR-10).
        step_size: PGD step as a fraction of ``eps`` (the paper: eps/10, i.e. 0.1).
        max_rounds: Upper limit on outer rounds.
        stop_accuracy: Stop once the model's accuracy on the perturbed data reaches this.
        lr: SGD learning rate of the crafting model.
        batch_size: Batch size of both steps.
        progress: Show a progress bar over the rounds.
        device: Where the crafting model and the noise are computed (``"auto"``, ``"cpu"``, ``"cuda[:i]"``,
            ``"mps"``); see :func:`~lightning_defense.core.device.resolve_device`.
        precision: ``"32"``, or ``"bf16"``: bfloat16 autocast of the crafting model's training steps on a
            CUDA GPU (the error-minimising PGD steps stay in float32).

    Example::

        poisons = ErrorMinimizingNoise(eps=8 / 255).craft(images, labels, seed=0)
    """

    name = "em"

    def __init__(self, eps: float, norm: str = "linf", budget: float = 1.0, backbone: str = "small_cnn",
                 backbone_kwargs: Optional[dict] = None, train_steps: int = 10, perturb_steps: int = 20,
                 step_size: float = 0.1, max_rounds: int = 20, stop_accuracy: float = 0.99, lr: float = 0.1,
                 batch_size: int = 128, progress: bool = True, device: str = "auto", precision: str = "32") -> None:
        super().__init__(eps, norm, budget, progress, device, precision)
        for name, value in (("train_steps", train_steps), ("perturb_steps", perturb_steps), ("max_rounds", max_rounds),
                            ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        if not 0 < step_size <= 1:
            raise ValueError(f"step_size is a fraction of eps in (0, 1]; got {step_size!r}")
        if not 0 < stop_accuracy <= 1:
            raise ValueError(f"stop_accuracy must be in (0, 1]; got {stop_accuracy!r}")
        self.backbone, self.backbone_kwargs = backbone, backbone_kwargs
        self.train_steps, self.perturb_steps, self.step_size = train_steps, perturb_steps, step_size
        self.max_rounds, self.stop_accuracy, self.lr, self.batch_size = max_rounds, stop_accuracy, lr, batch_size

    def craft(self, images: Tensor, labels: Tensor, *, goal: Optional[AttackGoal] = None, seed: int = 0) -> PoisonSet:
        check_split(images, labels)
        torch.manual_seed(int(seed))
        self._model = ImageClassifier(self.backbone, num_classes=max(int(labels.max()) + 1, 2), in_chans=images.shape[1],
                                      backbone_kwargs=self.backbone_kwargs)
        return super().craft(images, labels, goal=goal, seed=seed)

    def perturbation(self, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
        device = images.device  # the attack's device (IndiscriminateAttack.craft put the split there)
        model = self._model.to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        n, step = len(images), self.step_size * self.eps
        start = (torch.rand(images.shape, generator=generator) * 2 - 1).to(device)  # the keyed CPU stream
        delta = project(start * self.eps, images, self.eps, self.norm)
        cursor, order = 0, torch.randperm(n, generator=generator)
        with self._bar(self.max_rounds, "min-min rounds") as bar:
            for _ in range(self.max_rounds):
                model.train()  # (1) a few steps of training on the perturbed data
                for _ in range(self.train_steps):
                    if cursor >= n:
                        cursor, order = 0, torch.randperm(n, generator=generator)
                    batch = order[cursor:cursor + self.batch_size]
                    cursor += self.batch_size
                    x = random_crop_flip(images[batch] + delta[batch], 2, False, generator=generator)
                    with autocast(device, self.precision):
                        loss = F.cross_entropy(model(x), labels[batch])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                model.eval()  # (2) error-minimising PGD on every sample's delta
                correct = 0
                for start in range(0, n, self.batch_size):
                    rows = slice(start, start + self.batch_size)
                    d = delta[rows].clone()
                    for _ in range(self.perturb_steps):
                        d.requires_grad_(True)
                        loss = F.cross_entropy(model(images[rows] + d), labels[rows])
                        (grad,) = torch.autograd.grad(loss, d)
                        d = project(d.detach() - step * _direction(grad, self.norm), images[rows], self.eps, self.norm)
                    delta[rows] = d
                    with torch.no_grad():
                        correct += (model(images[rows] + d).argmax(1) == labels[rows]).sum().item()
                bar.update()
                bar.set_postfix(acc=f"{correct / n:.3f}")
                if correct / n >= self.stop_accuracy:
                    break
        del self._model
        return delta


def _direction(grad: Tensor, norm: str) -> Tensor:
    """Steepest-descent direction of a PGD step: the sign for l_inf, the unit gradient for l2."""
    if norm == "linf":
        return grad.sign()
    return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.ndim - 1)))

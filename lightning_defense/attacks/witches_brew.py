"""Witches' Brew: targeted clean-label poisoning by gradient matching (Geiping et al., ICLR 2021).

The attacker trains a surrogate on clean data, then perturbs ``budget * N`` images of the adversarial class
so that the training gradient of the poisons points where the adversarial loss of the target descends:

    minimise over delta   1 - cos( grad_theta L(f(x_p + delta), y_p),  grad_theta L(f(x_t), y_adv) )

with signed Adam (the sign of the gradient, then Adam), x0.1 learning-rate steps at 3/8, 5/8 and 7/8 of
the steps, differentiable crop/flip augmentation of the poisons, ``restarts`` random starts (the lowest
final alignment loss wins), and projection onto the eps-ball and the [0, 1] box after every step.

Two options of Geiping's toolkit and of Sleeper Agent (Souri et al., NeurIPS 2022) make the poisons
transfer to victims trained from scratch: an ``ensemble`` of surrogates trained with different seeds
(the alignment loss is averaged over them) and ``retrain_rounds`` (the surrogates are retrained from
scratch on the current poisoned training set at evenly spaced steps, and the target gradient recomputed).
``selection="max_gradient"`` picks the candidate poisons with the largest surrogate gradient norm
(Sleeper Agent's data selection) instead of at random.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_defense.attacks.base import (
    Attack,
    AttackGoal,
    budget_count,
    budget_indices,
    check_split,
    poison_set,
    project,
    require_goal,
    target_fields,
    train_surrogate,
)
from lightning_defense.datamodules.poison import PoisonSet
from lightning_defense.models.augment import random_crop_flip

SELECTIONS = ("random", "max_gradient")

# The gradient an attack wants its poisons to imitate, computed on one surrogate.
TargetGradient = Callable[[torch.nn.Module], list[Tensor]]


def goal_gradient(inputs: Tensor, wanted: Tensor):
    """The attacker's goal gradient: ``model -> grad_theta CE(f(inputs), wanted)`` over the trainable parameters.

    The inputs move to the model's device (a no-op when the caller put them there).
    """

    def gradient(model) -> list[Tensor]:
        params = [p for p in model.parameters() if p.requires_grad]
        device = params[0].device
        return list(torch.autograd.grad(F.cross_entropy(model(inputs.to(device)), wanted.to(device)), params))

    return gradient


class GradientMatchingAttack(Attack):
    """Shared machinery of Witches' Brew and Sleeper Agent: surrogates, signed Adam, restarts, retraining.

    Args:
        eps: Bound in [0, 1] pixel units (the papers: 16/255 in l_inf).
        norm: ``"linf"`` or ``"l2"``.
        budget: Fraction of the training set poisoned (the papers: 1%), all from one class.
        steps: Signed-Adam steps per restart (Geiping's toolkit: 250).
        restarts: Random restarts (the toolkit: 8); the one with the best final alignment is kept.
        lr: Adam step as a fraction of ``eps`` (the toolkit's tau = 0.1).
        augment: Differentiable random crop/flip of the poisons while crafting.
        crop_padding: Crop padding of that augmentation (and of the surrogate's training).
        flip: Horizontal flips (off for digits).
        backbone: Surrogate architecture (an :class:`ImageClassifier` backbone name).
        backbone_kwargs: Extra backbone arguments, e.g. ``{"width": 16}``.
        surrogate_epochs: Epochs of clean training of the surrogate.
        surrogate_lr: Its SGD learning rate.
        batch_size: Poisons per gradient-matching batch (the poison gradient is summed over batches).
        ensemble: Surrogates trained with different seeds; the alignment loss is their mean (1 = the paper's
            single model).
        retrain_rounds: Times the surrogates are retrained from scratch on the current poisoned set during
            each restart, evenly spaced over the steps (Sleeper Agent: 4; 0 = never).
        selection: ``"random"`` candidates, or ``"max_gradient"``: those with the largest surrogate
            gradient norm (Sleeper Agent's data selection).
        progress: Show a progress bar.
        device: Where the surrogates are trained and the poisons crafted (``"auto"``, ``"cpu"``,
            ``"cuda[:i]"``, ``"mps"``); see :func:`~lightning_defense.core.device.resolve_device`.
        precision: ``"32"``, or ``"bf16"``: bfloat16 autocast of the surrogates' training on a CUDA GPU
            (gradient matching itself, a second-order loss, stays in float32).

    Raises:
        ValueError: On a bad argument, naming it.
    """

    def __init__(self, eps: float = 16 / 255, norm: str = "linf", budget: float = 0.01, steps: int = 250,
                 restarts: int = 8, lr: float = 0.1, augment: bool = True, crop_padding: int = 2, flip: bool = False,
                 backbone: str = "small_cnn", backbone_kwargs: Optional[dict] = None, surrogate_epochs: int = 10,
                 surrogate_lr: float = 0.05, batch_size: int = 128, ensemble: int = 1, retrain_rounds: int = 0,
                 selection: str = "random", progress: bool = True, device: str = "auto",
                 precision: str = "32") -> None:
        super().__init__(eps, norm, budget, progress, device, precision)
        for name, value in (("steps", steps), ("restarts", restarts), ("surrogate_epochs", surrogate_epochs),
                            ("batch_size", batch_size), ("ensemble", ensemble)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        if not isinstance(retrain_rounds, int) or isinstance(retrain_rounds, bool) or not 0 <= retrain_rounds < steps:
            raise ValueError(f"retrain_rounds must be an int in [0, steps) = [0, {steps}); got {retrain_rounds!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}; got {selection!r}")
        if not lr > 0:
            raise ValueError(f"lr (a fraction of eps) must be > 0; got {lr!r}")
        self.steps, self.restarts, self.lr = steps, restarts, lr
        self.augment, self.crop_padding, self.flip = augment, crop_padding, flip
        self.backbone, self.backbone_kwargs = backbone, backbone_kwargs
        self.surrogate_epochs, self.surrogate_lr, self.batch_size = surrogate_epochs, surrogate_lr, batch_size
        self.ensemble, self.retrain_rounds, self.selection = ensemble, retrain_rounds, selection

    def surrogate(self, images: Tensor, labels: Tensor, seed: int):
        """The attacker's model, trained on ``(images, labels)`` on the attack's device (stage ``<name>.surrogate``)."""
        return train_surrogate(images, labels, backbone=self.backbone, backbone_kwargs=self.backbone_kwargs,
                               epochs=self.surrogate_epochs, lr=self.surrogate_lr, crop_padding=self.crop_padding,
                               flip=self.flip, seed=seed, progress=self.progress, desc=f"{self.name}: surrogate",
                               device=self.device, precision=self.precision, stage=f"{self.name}.surrogate",
                               collective=self.collective)

    def surrogates_and_poisons(self, images: Tensor, labels: Tensor, poison_class: int, role: str,
                               generator: torch.Generator, seed: int) -> tuple[list, Tensor]:
        """The surrogates and the ``budget * N`` poison indices, all training images of ``poison_class``.

        Raises:
            ValueError: When the class has fewer images than the budget asks for.
        """
        candidates = (labels == poison_class).nonzero().flatten()
        count = budget_count(self.budget, len(images))
        what = f"training images of the {role} {poison_class}"
        if count > len(candidates):
            budget_indices(candidates, count, generator, what)  # raises, naming the shortfall
        models = self.surrogates(images, labels, seed)
        return models, self.select(models[0], images, labels, candidates, count, generator, what)

    def surrogates(self, images: Tensor, labels: Tensor, seed: int) -> list:
        """``ensemble`` surrogates, the k-th trained with seed ``seed + k``."""
        return [self.surrogate(images, labels, seed + k) for k in range(self.ensemble)]

    def select(self, model, images: Tensor, labels: Tensor, candidates: Tensor, count: int,
               generator: torch.Generator, what: str) -> Tensor:
        """``count`` poison indices among ``candidates``: at random, or by largest gradient norm on ``model``."""
        if self.selection == "random" or count > len(candidates):
            return budget_indices(candidates, count, generator, what)
        params = [p for p in model.parameters() if p.requires_grad]
        device = params[0].device
        norms = torch.empty(len(candidates))
        for row, index in enumerate(candidates.tolist()):
            loss = F.cross_entropy(model(images[index:index + 1].float().to(device)), labels[index:index + 1].to(device))
            grads = torch.autograd.grad(loss, params)
            norms[row] = torch.sqrt(sum((g * g).sum() for g in grads))
        return candidates[norms.argsort(descending=True, stable=True)[:count]].sort().values

    def brew(self, images: Tensor, labels: Tensor, indices: Tensor, target_gradient: TargetGradient,
             models: list, generator: torch.Generator, seed: int, desc: str = "gradient matching") -> tuple[Tensor, float]:
        """Optimise delta for ``images[indices]``; retrain the surrogates ``retrain_rounds`` times; best of restarts.

        Args:
            images, labels: The clean training split.
            indices: The poisoned rows.
            target_gradient: Gradient the poisons should align with, computed on one surrogate.
            models: The clean surrogates (each restart starts from them).
            generator: Seeds the random starts and the augmentation.
            seed: Base seed of the retrained surrogates.
            desc: Progress-bar label.

        Returns:
            ``(delta, final alignment loss)`` of the best restart, on the surrogates' device.
        """
        device = next(models[0].parameters()).device  # crafting runs where the surrogates are
        images, labels = images.to(device), labels.to(device)
        clean = images[indices].float()
        poison_labels = labels[indices]
        retrain_at = {round(self.steps * (r + 1) / (self.retrain_rounds + 1)) for r in range(self.retrain_rounds)}
        best, best_loss = None, float("inf")
        with self._bar(self.restarts * self.steps, desc) as bar:
            for restart in range(self.restarts):
                current = list(models)
                targets = [self._target(m, target_gradient) for m in current]
                start = (torch.rand(clean.shape, generator=generator) * 2 - 1).to(device)  # the keyed CPU stream
                delta = project(start * self.eps, clean, self.eps, self.norm)
                delta.requires_grad_(True)
                optimizer = torch.optim.Adam([delta], lr=self.lr * self.eps)
                milestones = [round(self.steps * f) for f in (3 / 8, 5 / 8, 7 / 8)]
                scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, 0.1)
                for step in range(self.steps):
                    if step in retrain_at:
                        poisoned = images.clone()
                        poisoned[indices] = (clean + delta).detach()
                        current = self.surrogates(poisoned, labels, seed + 1009 * (restart * self.steps + step + 1))
                        targets = [self._target(m, target_gradient) for m in current]
                    loss = self._ensemble_loss(current, targets, clean, delta, poison_labels, generator if self.augment else None)
                    (grad,) = torch.autograd.grad(loss, delta)
                    delta.grad = grad.sign()
                    optimizer.step()
                    scheduler.step()
                    with torch.no_grad():
                        delta.copy_(project(delta, clean, self.eps, self.norm))
                    bar.update()
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                final = self._ensemble_loss(current, targets, clean, delta, poison_labels, None).item()
                if final < best_loss:
                    best, best_loss = delta.detach().clone(), final
        return best, best_loss

    @staticmethod
    def _target(model, target_gradient: TargetGradient) -> tuple[list[Tensor], Tensor]:
        grads = [g.detach() for g in target_gradient(model)]
        return grads, torch.sqrt(sum((g * g).sum() for g in grads))

    def _ensemble_loss(self, models, targets, clean, delta, labels, generator) -> Tensor:
        """Mean over the surrogates of the alignment loss."""
        losses = [self._alignment_loss(m, [p for p in m.parameters() if p.requires_grad], clean, delta, labels,
                                       grad, norm, generator) for m, (grad, norm) in zip(models, targets)]
        return torch.stack(losses).mean()

    def _alignment_loss(self, model, params, clean, delta, labels, target_grad, target_norm, generator) -> Tensor:
        """1 - cosine similarity of the poison-batch gradient and the target gradient (summed over batches)."""
        grads = None
        for start in range(0, len(clean), self.batch_size):
            rows = slice(start, start + self.batch_size)
            x = clean[rows] + delta[rows]
            if generator is not None:
                x = random_crop_flip(x, self.crop_padding, self.flip, generator=generator)
            loss = F.cross_entropy(model(x), labels[rows], reduction="sum") / len(clean)
            batch_grads = torch.autograd.grad(loss, params, create_graph=True)
            grads = list(batch_grads) if grads is None else [a + b for a, b in zip(grads, batch_grads)]
        dot = sum((g * t).sum() for g, t in zip(grads, target_grad))
        poison_norm = torch.sqrt(sum((g * g).sum() for g in grads))
        return 1 - dot / (poison_norm * target_norm + 1e-12)


class WitchesBrew(GradientMatchingAttack):
    """Witches' Brew (Geiping et al. 2021): make the victim classify ``goal.target_image`` as ``goal.adversarial_label``.

    The poisons are ``budget * N`` training images of the adversarial class. See
    :class:`GradientMatchingAttack` for the arguments.

    Example::

        attack = WitchesBrew(eps=16 / 255, budget=0.01, steps=250, restarts=8)
        goal = attack.sample_goal(test_images, test_labels, num_classes=10, seed=0)
        poisons = attack.craft(train_images, train_labels, goal=goal, seed=0)
    """

    kind = "targeted"
    name = "witches_brew"

    def craft(self, images: Tensor, labels: Tensor, *, goal: Optional[AttackGoal] = None, seed: int = 0) -> PoisonSet:
        check_split(images, labels)
        goal = require_goal(self, goal, "target_image", "adversarial_label")
        device = self.stage_device("craft")
        generator = torch.Generator().manual_seed(int(seed))
        models, indices = self.surrogates_and_poisons(images, labels, goal.adversarial_label, "adversarial class",
                                                      generator, seed)
        target = goal.target_image[None].float()
        adversarial = torch.tensor([goal.adversarial_label])

        delta, loss = self.brew(images, labels, indices, goal_gradient(target.to(device), adversarial.to(device)),
                                models, generator, seed)
        clean = images[indices].float().to(delta.device)
        return poison_set(
            indices, clean + delta, labels[indices], self, **target_fields(goal, goal.target_image),
            metadata=self._metadata(seed, alignment_loss=f"{loss:.4f}", target_index=goal.target_index),
        )

"""Random noise: URP, the class-wise attack, and the per-sample noise control of the other attacks.

:class:`UniversalRandomPerturbation` (URP; Huang et al. 2021; Tao et al. 2021): every image of class c gets
the same random pattern delta_c. No model is involved: the network learns the class-wise pattern, an easy
shortcut, instead of the digits or objects, and its clean test accuracy drops.

:class:`RandomNoiseControl`: every poisoned sample gets its own random draw in the same eps-ball and budget,
with no class structure. An attack's success counts only against this noise (e.g. for EM, Huang et al.'s
error-minimising noise, which starts from the same uniform draw).

:class:`TargetedNoiseControl`: the same for a targeted attack trained from scratch (Witches' Brew): the
attack's budget of adversarial-class images, each with its own random draw, scored on the attack's target.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_defense.attacks.base import (
    Attack,
    AttackGoal,
    IndiscriminateAttack,
    adversarial_class_poisons,
    check_split,
    poison_set,
    project,
    random_delta,
    require_goal,
    scale_to_ball,
    target_fields,
)
from lightning_defense.datamodules.poison import PoisonSet


class UniversalRandomPerturbation(IndiscriminateAttack):
    """Class-wise random noise: ``x + delta_{y}`` with one pattern per class.

    For ``linf`` each pattern is uniform in [-eps, eps] per pixel; for ``l2`` it is Gaussian, scaled to
    l2 norm ``eps``. Pixels are then clipped to [0, 1].

    Args:
        eps: Bound in [0, 1] pixel units (ECLIPSE's setting: 8/255 in l_inf).
        norm: ``"linf"`` or ``"l2"``.
        budget: Fraction of the training set perturbed (1.0: all of it, as in ECLIPSE).
        progress: Unused (crafting is instantaneous); kept for the common interface.
        device: Where the perturbations are computed (``"auto"``, ``"cpu"``, ``"cuda[:i]"``, ``"mps"``); the random
            draws stay on the CPU, so the poisons are the same bytes on every device up to float rounding.

    Example::

        poisons = UniversalRandomPerturbation(eps=8 / 255).craft(images, labels, seed=0)
    """

    name = "urp"

    def perturbation(self, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
        num_classes = int(labels.max()) + 1
        shape = (num_classes, *images.shape[1:])
        if self.norm == "linf":
            patterns = (torch.rand(shape, generator=generator) * 2 - 1) * self.eps
        else:
            patterns = scale_to_ball(torch.randn(shape, generator=generator), self.eps, "l2")
        return patterns.to(labels.device)[labels]  # drawn on the CPU (the keyed stream), used on the attack's device


class RandomNoiseControl(IndiscriminateAttack):
    """The random-noise control of a sample-wise attack: its own random draw per sample, same ball and budget.

    For ``linf`` each pixel of each sample's delta is uniform in [-eps, eps] (the starting point of EM's
    PGD); for ``l2`` each delta is Gaussian, scaled to l2 norm ``eps``. Unlike :class:`UniversalRandomPerturbation`,
    two samples of one class get different noise, so there is no class-wise shortcut to learn. The draws come
    from the seeded generator that :meth:`IndiscriminateAttack.craft` passes (after it picked the budget's
    samples), and the base class projects onto the eps-ball and the [0, 1] box.

    Args:
        eps: Bound in [0, 1] pixel units, the attack's own (EM: 8/255 in l_inf).
        norm: ``"linf"`` or ``"l2"``.
        budget: Fraction of the training set perturbed, the attack's own.
        progress: Unused (crafting is instantaneous); kept for the common interface.
        device: Where the perturbations are computed (``"auto"``, ``"cpu"``, ``"cuda[:i]"``, ``"mps"``); the random
            draws stay on the CPU, so the poisons are the same bytes on every device up to float rounding.

    Raises:
        ValueError: On an eps, norm or budget outside the accepted range (see :class:`Attack`).

    Example::

        control = RandomNoiseControl(eps=8 / 255).craft(images, labels, seed=0)  # EM's control
    """

    name = "random_noise"

    def perturbation(self, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
        # drawn on the CPU (the keyed stream), used on the attack's device
        return random_delta(images.shape, self.eps, self.norm, generator).to(images.device)


class TargetedNoiseControl(Attack):
    """The random-noise control of a targeted attack (Witches' Brew): same goal, samples, budget and ball.

    With the attack's seed it takes the trial's goal (:meth:`Attack.sample_goal`) and the same ``budget * N``
    training images of the adversarial class that Witches' Brew (``selection="random"``) and the
    feature-collision attacks pick, and perturbs each by its own random draw
    (:func:`~lightning_defense.attacks.base.random_delta`), projected onto the ball and the [0, 1] box. A
    target it "flips" is the victim's own error: the floor the attack's success counts against. For transfer
    victims use :class:`~lightning_defense.attacks.FeatureCollisionNoiseControl`, which carries the extractor.

    Args: ``eps``, ``norm``, ``budget``, ``progress``, ``device``, ``precision``: see :class:`Attack` (the
    attack's own values).

    Example::

        control = TargetedNoiseControl(eps=16 / 255, budget=0.01)
        poisons = control.craft(images, labels, goal=goal, seed=0)  # the attack's goal and seed
    """

    kind = "targeted"
    name = "targeted_noise_control"

    def craft(self, images: Tensor, labels: Tensor, *, goal: Optional[AttackGoal] = None, seed: int = 0) -> PoisonSet:
        check_split(images, labels)
        goal = require_goal(self, goal, "target_image", "adversarial_label")
        generator = torch.Generator().manual_seed(int(seed))
        indices = adversarial_class_poisons(self, labels, goal, generator)
        clean = images[indices].float()
        delta = project(random_delta(clean.shape, self.eps, self.norm, generator), clean, self.eps, self.norm)
        return poison_set(indices, clean + delta, labels[indices], self, **target_fields(goal, goal.target_image),
                          metadata=self._metadata(seed, target_index=goal.target_index))

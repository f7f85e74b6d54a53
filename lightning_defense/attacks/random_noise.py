"""Random noise: URP, the class-wise attack, and the per-sample noise control of the other attacks.

:class:`UniversalRandomPerturbation` (URP; Huang et al. 2021; Tao et al. 2021): every image of class c gets
the same random pattern delta_c. No model is involved: the network learns the class-wise pattern, an easy
shortcut, instead of the digits or objects, and its clean test accuracy drops.

:class:`RandomNoiseControl`: every poisoned sample gets its own random draw in the same eps-ball and budget,
with no class structure. An attack's success counts only against this noise (e.g. for EM, Huang et al.'s
error-minimising noise, which starts from the same uniform draw).

:class:`TargetedNoiseControl`: the same for a targeted attack trained from scratch (Witches' Brew): the
attack's budget of adversarial-class images, each with its own random draw, scored on the attack's target.

:class:`BackdoorNoiseControl`: the same for a hidden-trigger backdoor (Sleeper Agent): the attack's budget of
target-class images, each with its own random draw, scored on the attack's trigger and classes.
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
    budget_count,
    budget_indices,
    check_split,
    poison_set,
    project,
    random_delta,
    require_goal,
    scale_to_ball,
    target_fields,
)
from lightning_defense.attacks.sleeper_agent import backdoor_pair, check_trigger, placed_trigger
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


class BackdoorNoiseControl(Attack):
    """The random-noise control of a hidden-trigger backdoor (Sleeper Agent): same goal, trigger, budget and ball.

    It perturbs ``budget * N`` training images of the goal's target class (labels kept, as Sleeper Agent's
    poisons), each by its own random draw projected onto the ball and the [0, 1] box, and carries the
    attack's trigger, so a victim trained on it is scored like the attack's: the rate at which triggered
    source-class test images go to the target class. That rate is the floor the backdoor counts against: what
    the patch and the victim do without gradient matching. The images are drawn at random: Sleeper Agent's
    max-gradient selection needs its surrogate, and random noise on other images of the class is the same
    control. Pass the attack's own trigger arguments (e.g. one YAML anchor) and use its goal and seed.

    Args:
        eps, norm, budget: The attack's threat model (see :class:`Attack`).
        patch_size, trigger, trigger_xy, trigger_seed: The attack's trigger (see :class:`SleeperAgent`).
        progress, device, precision: See :class:`Attack`.

    Raises:
        ValueError: On a bad argument, or at :meth:`craft` a goal without source and target class.

    Example::

        control = BackdoorNoiseControl(eps=16 / 255, budget=0.01, patch_size=8)
        poisons = control.craft(images, labels, goal=AttackGoal(source_class=8, target_class=5), seed=0)
    """

    kind = "backdoor"
    name = "backdoor_noise_control"

    def __init__(self, eps: float = 16 / 255, norm: str = "linf", budget: float = 0.01, patch_size: int = 8,
                 trigger: str = "random", trigger_xy: Optional[str] = None, trigger_seed: int = 0,
                 progress: bool = True, device: str = "auto", precision: str = "32") -> None:
        super().__init__(eps, norm, budget, progress, device, precision)
        check_trigger(patch_size, trigger, trigger_xy, trigger_seed)
        self.patch_size, self.trigger, self.trigger_xy, self.trigger_seed = patch_size, trigger, trigger_xy, trigger_seed

    def craft(self, images: Tensor, labels: Tensor, *, goal: Optional[AttackGoal] = None, seed: int = 0) -> PoisonSet:
        check_split(images, labels)
        source_class, target_class = backdoor_pair(self, goal)
        trigger, xy = placed_trigger(images, self.patch_size, self.trigger, self.trigger_seed, self.trigger_xy)
        generator = torch.Generator().manual_seed(int(seed))
        candidates = (labels == target_class).nonzero().flatten()
        indices = budget_indices(candidates, budget_count(self.budget, len(labels)), generator,
                                 f"training images of the target class {target_class}")
        clean = images[indices].float()
        delta = project(random_delta(clean.shape, self.eps, self.norm, generator), clean, self.eps, self.norm)
        return poison_set(indices, clean + delta, labels[indices], self, trigger=trigger, source_class=source_class,
                          target_class=target_class,
                          metadata=self._metadata(seed, trigger_xy=xy, patch_size=self.patch_size, trigger=self.trigger))

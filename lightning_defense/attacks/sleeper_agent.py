"""Sleeper Agent: hidden-trigger clean-label backdoor by gradient matching (Souri et al., NeurIPS 2022).

The attacker picks a patch trigger, a source class and a target class. It perturbs ``budget * N`` training
images of the TARGET class (their labels stay clean) so that their training gradient aligns with the
gradient of the loss that sends trigger-patched SOURCE-class images to the target class:

    minimise over delta   1 - cos( grad_theta L(f(x_p + delta), y_t),  grad_theta mean_s L(f(x_s + trigger), y_t) )

A victim trained on the poisons then learns the backdoor without ever seeing the trigger in training.
On top of Witches' Brew's signed Adam (see :class:`GradientMatchingAttack`) the paper adds

- data selection: the poisons are the target-class images with the largest surrogate gradient norm;
- retraining: during crafting the surrogate is retrained from scratch on the current poisoned set
  ``retrain_rounds`` times (the paper: 4) and the source gradient recomputed, so the poisons work on
  models trained on them rather than only on the clean surrogate.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_defense.attacks.base import (
    AttackGoal,
    apply_trigger,
    check_split,
    poison_set,
    require_goal,
)
from lightning_defense.attacks.witches_brew import GradientMatchingAttack, goal_gradient
from lightning_defense.datamodules.poison import PoisonSet

TRIGGERS = ("random", "checkerboard")


def make_trigger(channels: int, patch_size: int, pattern: str = "random", seed: int = 0) -> Tensor:
    """A ``(channels, patch_size, patch_size)`` backdoor patch in {0, 1}.

    Args:
        channels: Image channels.
        patch_size: Side of the square patch in pixels.
        pattern: ``"random"`` (seeded black/white pixels, the paper's random patch) or ``"checkerboard"``.
        seed: Seeds the random pattern.

    Raises:
        ValueError: On an unknown pattern or a patch size < 1.
    """
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be an int >= 1; got {patch_size!r}")
    if pattern == "checkerboard":
        rows = torch.arange(patch_size)
        board = ((rows[:, None] + rows[None, :]) % 2).float()
        return board.expand(channels, -1, -1).clone()
    if pattern == "random":
        generator = torch.Generator().manual_seed(int(seed))
        return torch.randint(0, 2, (channels, patch_size, patch_size), generator=generator).float()
    raise ValueError(f"trigger must be one of {TRIGGERS}; got {pattern!r}")


def backdoor_pair(attack, goal: Optional[AttackGoal]) -> tuple[int, int]:
    """A backdoor goal's ``(source_class, target_class)``, checked to be present and distinct."""
    goal = require_goal(attack, goal, "source_class", "target_class")
    source_class, target_class = int(goal.source_class), int(goal.target_class)
    if source_class == target_class:
        raise ValueError(f"source_class and target_class must differ; got both {source_class}")
    return source_class, target_class


def check_trigger(patch_size: int, pattern: str, xy: Optional[str], seed: int) -> None:
    """Validate a backdoor's trigger arguments early (see :class:`SleeperAgent`), before any crafting."""
    make_trigger(1, patch_size, pattern, seed)
    if xy is not None:
        parts = str(xy).split(",")
        if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
            raise ValueError(f"trigger_xy must be 'x,y' (column, row of the top-left corner) or None; got {xy!r}")


def placed_trigger(images: Tensor, patch_size: int, pattern: str, seed: int, xy: Optional[str]) -> tuple[Tensor, str]:
    """The trigger for ``images`` (their channels) and its ``"x,y"`` position: ``xy``, or the bottom-right corner.

    Raises:
        ValueError: When the patch does not fit the images at that position.
    """
    height, width = images.shape[-2:]
    trigger, xy = make_trigger(images.shape[1], patch_size, pattern, seed), xy or f"{width - patch_size},{height - patch_size}"
    apply_trigger(images[:0], trigger, xy)
    return trigger, xy


class SleeperAgent(GradientMatchingAttack):
    """Sleeper Agent (Souri et al. 2022): triggered ``goal.source_class`` inputs go to ``goal.target_class``.

    Args:
        eps, norm, budget: Threat model (the paper: 16/255 l_inf, 1% of the training set).
        patch_size: Side of the square trigger (the paper: 8 on 32x32 CIFAR-10).
        trigger: ``"random"`` or ``"checkerboard"`` pattern (see :func:`make_trigger`).
        trigger_xy: ``"x,y"`` (column, row) of the patch's top-left corner; None = bottom-right corner.
        trigger_seed: Seeds the random pattern (the same trigger across trials by default).
        max_source: At most this many triggered source-class training images for the source gradient
            (a seeded random subset); None uses them all.
        steps, restarts, retrain_rounds, selection, ensemble, ...: See :class:`GradientMatchingAttack`;
            the defaults are the paper's (250 steps, 1 restart, 4 retraining rounds, max-gradient selection).

    Raises:
        ValueError: On a bad argument, naming it.

    Example::

        attack = SleeperAgent(eps=16 / 255, budget=0.01, patch_size=8)
        goal = attack.sample_goal(test_images, test_labels, num_classes=10, seed=0)
        poisons = attack.craft(train_images, train_labels, goal=goal, seed=0)
        triggered = apply_trigger(source_images, poisons.trigger, poisons.metadata["trigger_xy"])
    """

    kind = "backdoor"
    name = "sleeper_agent"

    def __init__(self, eps: float = 16 / 255, norm: str = "linf", budget: float = 0.01, patch_size: int = 8,
                 trigger: str = "random", trigger_xy: Optional[str] = None, trigger_seed: int = 0,
                 max_source: Optional[int] = None, steps: int = 250, restarts: int = 1, retrain_rounds: int = 4,
                 selection: str = "max_gradient", **kwargs) -> None:
        super().__init__(eps, norm, budget, steps=steps, restarts=restarts, retrain_rounds=retrain_rounds,
                         selection=selection, **kwargs)
        check_trigger(patch_size, trigger, trigger_xy, trigger_seed)
        if max_source is not None and (not isinstance(max_source, int) or max_source < 1):
            raise ValueError(f"max_source must be an int >= 1 or None; got {max_source!r}")
        self.patch_size, self.trigger, self.trigger_xy, self.trigger_seed = patch_size, trigger, trigger_xy, trigger_seed
        self.max_source = max_source

    def craft(self, images: Tensor, labels: Tensor, *, goal: Optional[AttackGoal] = None, seed: int = 0) -> PoisonSet:
        check_split(images, labels)
        source_class, target_class = backdoor_pair(self, goal)
        trigger, xy = placed_trigger(images, self.patch_size, self.trigger, self.trigger_seed, self.trigger_xy)
        device = self.stage_device("craft")
        generator = torch.Generator().manual_seed(int(seed))

        sources = (labels == source_class).nonzero().flatten()
        if len(sources) == 0:
            raise ValueError(f"no training images of the source class {source_class}; pick another source_class")
        if self.max_source is not None and len(sources) > self.max_source:
            sources = sources[torch.randperm(len(sources), generator=generator)[:self.max_source]].sort().values
        triggered = apply_trigger(images[sources].float(), trigger, xy)
        wanted = torch.full((len(triggered),), target_class)

        models, indices = self.surrogates_and_poisons(images, labels, target_class, "target class", generator, seed)

        delta, loss = self.brew(images, labels, indices, goal_gradient(triggered.to(device), wanted.to(device)), models,
                                generator, seed)
        clean = images[indices].float().to(delta.device)
        return poison_set(
            indices, clean + delta, labels[indices], self, trigger=trigger, source_class=source_class,
            target_class=target_class,
            metadata=self._metadata(seed, alignment_loss=f"{loss:.4f}", trigger_xy=xy, patch_size=self.patch_size,
                                    trigger=self.trigger),
        )

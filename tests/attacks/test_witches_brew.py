"""Witches' Brew: bound, budget, adversarial-class poisons, seeding and goal handling."""

import pytest
import torch

from tests.attacks.conftest import check_targeted_poisons

from lightning_defense.attacks import AttackGoal, WitchesBrew, train_surrogate

TINY = dict(steps=3, restarts=2, surrogate_epochs=1, backbone_kwargs={"width": 4}, progress=False)


@pytest.mark.parametrize("norm,eps", [("linf", 16 / 255), ("l2", 0.5)])
def test_within_bound_budget_and_adversarial_class(norm, eps, small_split):
    x, y = small_split
    attack = WitchesBrew(eps=eps, norm=norm, budget=0.05, **TINY)
    check_targeted_poisons(attack, x, y, eps, norm)


def test_argument_errors(small_split):
    x, y = small_split
    with pytest.raises(ValueError, match="steps must be an int >= 1; got 0"):
        WitchesBrew(steps=0)
    with pytest.raises(ValueError, match="lr"):
        WitchesBrew(lr=-1.0)
    attack = WitchesBrew(budget=0.5, **TINY)
    with pytest.raises(ValueError, match="needs goal with target_image, adversarial_label"):
        attack.craft(x, y, seed=0)
    goal = AttackGoal(x[0], int(y[0]), int((y[0] + 1) % 10))
    with pytest.raises(ValueError, match=r"budget asks for 100 poisons but only \d+ training images of the adversarial"):
        attack.craft(x, y, goal=goal, seed=0)


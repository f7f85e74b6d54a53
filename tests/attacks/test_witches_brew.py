"""Witches' Brew: bound, budget, adversarial-class poisons, seeding and goal handling."""

import pytest
import torch

from lightning_defense.attacks import AttackGoal, WitchesBrew, train_surrogate

TINY = dict(steps=3, restarts=2, surrogate_epochs=1, backbone_kwargs={"width": 4}, progress=False)


@pytest.mark.parametrize("norm,eps", [("linf", 16 / 255), ("l2", 0.5)])
def test_within_bound_budget_and_adversarial_class(norm, eps, small_split):
    x, y = small_split
    attack = WitchesBrew(eps=eps, norm=norm, budget=0.05, **TINY)
    goal = attack.sample_goal(x, y, num_classes=10, seed=4)
    assert goal.adversarial_label != goal.target_label
    poisons = attack.craft(x, y, goal=goal, seed=0)
    assert len(poisons) == 10 and (poisons.labels == goal.adversarial_label).all()
    poisons.validate(x, y)
    linf, l2 = poisons.perturbation_norms(x)
    assert (linf if norm == "linf" else l2).max() <= eps + 1e-5
    assert linf.min() > 0
    assert poisons.kind == "targeted" and poisons.adversarial_labels.tolist() == [goal.adversarial_label]
    assert torch.equal(poisons.target_images[0], goal.target_image)
    again = attack.craft(x, y, goal=goal, seed=0)
    assert torch.equal(again.images, poisons.images) and torch.equal(again.indices, poisons.indices)


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


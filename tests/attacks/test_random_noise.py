"""RandomNoiseControl: the per-sample random-noise control (same eps-ball and budget as the attack it controls).

URP, the class-wise random attack in the same module, is covered with the other indiscriminate attacks in
test_indiscriminate.py.
"""

import math

import pytest
import torch

from lightning_defense.attacks import RandomNoiseControl

MID_GRAY = torch.full((400, 1, 16, 16), 0.5)  # the [0, 1] clip never acts at eps < 0.5
LABELS = torch.arange(400) % 10


@pytest.mark.parametrize("norm, eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_bound_is_respected_exactly(norm, eps, small_split):
    x, y = small_split
    poisons = RandomNoiseControl(eps=eps, norm=norm).craft(x, y, seed=0)
    poisons.validate(x, y)
    linf, l2 = poisons.perturbation_norms(x)
    assert (linf if norm == "linf" else l2).max() <= eps + 1e-6  # no slack on freshly crafted poisons
    assert ((poisons.images >= 0) & (poisons.images <= 1)).all()


def test_linf_noise_is_uniform_in_the_ball():
    poisons = RandomNoiseControl(eps=8 / 255).craft(MID_GRAY, LABELS, seed=0)
    delta = (poisons.images - MID_GRAY).flatten()
    eps = 8 / 255
    assert delta.abs().max() <= eps + 1e-7
    assert delta.abs().max() > 0.99 * eps  # it uses the whole ball...
    assert abs(delta.mean()) < 0.02 * eps  # ...centred...
    assert delta.std() == pytest.approx(eps / math.sqrt(3), rel=0.02)  # ...with a uniform's spread
    quartiles = torch.quantile(delta, torch.tensor([0.25, 0.75]))
    assert torch.allclose(quartiles, torch.tensor([-eps / 2, eps / 2]), atol=0.02 * eps)


def test_l2_noise_lies_on_the_sphere():
    poisons = RandomNoiseControl(eps=0.5, norm="l2").craft(MID_GRAY, LABELS, seed=0)
    _, l2 = poisons.perturbation_norms(MID_GRAY)
    assert torch.allclose(l2, torch.full_like(l2, 0.5), atol=1e-5)


@pytest.mark.parametrize("budget", [0.1, 0.25, 1.0])
def test_budget_is_respected(budget, small_split):
    x, y = small_split
    poisons = RandomNoiseControl(eps=8 / 255, budget=budget).craft(x, y, seed=1)
    assert len(poisons) == round(budget * len(x)) and len(poisons.indices.unique()) == len(poisons)
    applied = poisons.apply(x)
    untouched = torch.ones(len(x), dtype=torch.bool)
    untouched[poisons.indices] = False
    assert torch.equal(applied[untouched], x[untouched])  # only the budget's samples change
    assert ((applied[~untouched] - x[~untouched]).flatten(1).abs().amax(1) > 0).all()


def test_same_seed_same_noise_different_seed_different_noise():
    attack = RandomNoiseControl(eps=8 / 255, budget=0.5)
    a, b, c = (attack.craft(MID_GRAY, LABELS, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
    assert not torch.equal(a.indices, c.indices)
    full = RandomNoiseControl(eps=8 / 255)  # the same samples, so only the noise can differ
    d, e = (full.craft(MID_GRAY, LABELS, seed=s) for s in (1, 2))
    assert (d.images - e.images).abs().mean() > 0.5 * 8 / 255


def test_noise_is_not_class_wise():
    """Unlike URP, two samples of one class get unrelated noise: no class-wise shortcut to learn."""
    poisons = RandomNoiseControl(eps=8 / 255).craft(MID_GRAY, LABELS, seed=0)
    delta = (poisons.images - MID_GRAY).flatten(1)
    same_class = (LABELS == 3).nonzero().flatten()
    assert not torch.allclose(delta[same_class[0]], delta[same_class[1]])
    # The class means carry no signal beyond chance: far below the eps of a class-wise pattern.
    class_means = torch.stack([delta[LABELS == c].mean(0) for c in range(10)])
    assert class_means.abs().mean() < 0.15 * 8 / 255
    correlation = torch.corrcoef(delta[same_class[:20]])
    assert correlation[~torch.eye(20, dtype=torch.bool)].abs().max() < 0.5


@pytest.mark.parametrize("eps", [0, -0.1, float("nan"), float("inf"), "8/255", None])
def test_bad_eps_is_a_clear_error(eps):
    with pytest.raises(ValueError, match=r"eps must be a number > 0 in \[0, 1\] pixel units .* got"):
        RandomNoiseControl(eps=eps)


def test_bad_norm_and_budget_are_clear_errors():
    with pytest.raises(ValueError, match=r"norm must be one of \('linf', 'l2'\); got 'l1'"):
        RandomNoiseControl(eps=0.1, norm="l1")
    with pytest.raises(ValueError, match=r"budget must be a fraction of the training set in \(0, 1\]; got 0"):
        RandomNoiseControl(eps=0.1, budget=0)


@pytest.mark.parametrize("norm, eps", [("linf", 16 / 255), ("l2", 0.5)])
def test_targeted_control_takes_the_attacks_goal_and_samples(norm, eps, small_split):
    """Witches' Brew's control: the trial's goal, the same adversarial-class images as the attack, random
    deltas in its ball; scored as a targeted poison set (target and adversarial label recorded)."""
    from lightning_defense.attacks import TargetedNoiseControl, WitchesBrew
    from tests.attacks.conftest import check_targeted_poisons

    x, y = small_split
    control = TargetedNoiseControl(eps=eps, norm=norm, budget=0.05)
    check_targeted_poisons(control, x, y, eps, norm)  # bound, budget, adversarial class, goal, seeding
    brew = WitchesBrew(eps=eps, norm=norm, budget=0.05, steps=1, restarts=1, surrogate_epochs=1,
                       backbone_kwargs={"width": 4}, progress=False)
    goal = brew.sample_goal(x, y, num_classes=10, seed=7)
    assert control.sample_goal(x, y, num_classes=10, seed=7).target_index == goal.target_index
    noise, poisons = control.craft(x, y, goal=goal, seed=5), brew.craft(x, y, goal=goal, seed=5)
    assert torch.equal(noise.indices, poisons.indices)
    assert noise.target_labels.tolist() == [goal.target_label] and noise.metadata["target_index"] == str(goal.target_index)
    delta = noise.images - x[noise.indices]
    assert not torch.equal(delta[0], delta[1]) and delta.flatten(1).std(1).min() > 0
    assert not torch.equal(control.craft(x, y, goal=goal, seed=6).images, noise.images)
    with pytest.raises(ValueError, match="targeted_noise_control needs goal with target_image, adversarial_label"):
        control.craft(x, y, seed=0)


@pytest.mark.parametrize("norm, eps", [("linf", 16 / 255), ("l2", 0.5)])
def test_backdoor_control_carries_the_attacks_trigger_goal_and_class(norm, eps, small_split):
    """Sleeper Agent's control: target-class images with random deltas in its ball, the attack's trigger at its
    position and its classes, so a victim trained on it is scored exactly as on the attack's poisons."""
    from lightning_defense.attacks import AttackGoal, BackdoorNoiseControl, SleeperAgent
    from tests.attacks.conftest import check_backdoor_poisons

    x, y = small_split
    trigger = dict(patch_size=3, trigger="checkerboard", trigger_xy="1,2")
    control = BackdoorNoiseControl(eps=eps, norm=norm, budget=0.05, **trigger)
    goal, noise = check_backdoor_poisons(control, x, y, eps, norm, count=10)  # bound, budget, class, seeding
    attack = SleeperAgent(eps=eps, norm=norm, budget=0.05, steps=1, restarts=1, retrain_rounds=0, surrogate_epochs=1,
                          backbone_kwargs={"width": 4}, progress=False, **trigger)
    assert attack.sample_goal(x, y, num_classes=10, seed=4) == goal
    poisons = attack.craft(x, y, goal=goal, seed=0)
    assert torch.equal(noise.trigger, poisons.trigger)
    assert noise.metadata["trigger_xy"] == poisons.metadata["trigger_xy"] == "1,2"
    delta = noise.images - x[noise.indices]
    assert not torch.equal(delta[0], delta[1]) and delta.flatten(1).std(1).min() > 0
    assert not torch.equal(control.craft(x, y, goal=goal, seed=1).images, noise.images)
    default = BackdoorNoiseControl(budget=0.05, patch_size=4).craft(x, y, goal=goal, seed=0)
    assert default.metadata["trigger_xy"] == "12,12"  # the attack's default: the bottom-right corner
    with pytest.raises(ValueError, match="backdoor_noise_control needs goal with source_class, target_class"):
        control.craft(x, y, seed=0)
    with pytest.raises(ValueError, match="must differ"):
        control.craft(x, y, goal=AttackGoal(source_class=2, target_class=2), seed=0)
    with pytest.raises(ValueError, match="trigger_xy must be 'x,y'"):
        BackdoorNoiseControl(trigger_xy="3")
    with pytest.raises(ValueError, match="does not fit"):
        BackdoorNoiseControl(patch_size=20, budget=0.05).craft(x, y, goal=goal, seed=0)

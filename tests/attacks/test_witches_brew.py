"""Witches' Brew: bound, budget, adversarial-class poisons, seeding and goal handling."""

import pytest
import torch

from tests.attacks.conftest import check_targeted_poisons, random_sign_control

from lightning_defense.attacks import AttackGoal, WitchesBrew, train_surrogate

TINY = dict(steps=3, restarts=2, surrogate_epochs=1, backbone_kwargs={"width": 4}, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


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



def test_options_argument_errors():
    with pytest.raises(ValueError, match="ensemble must be an int >= 1; got 0"):
        WitchesBrew(ensemble=0)
    with pytest.raises(ValueError, match=r"retrain_rounds must be an int in \[0, steps\) = \[0, 5\); got 5"):
        WitchesBrew(steps=5, retrain_rounds=5)
    with pytest.raises(ValueError, match="selection must be one of"):
        WitchesBrew(selection="largest")


def test_ensemble_and_retraining_change_the_poisons_and_stay_in_bound(small_split):
    x, y = small_split
    goal = AttackGoal(x[0], int(y[0]), int((y[0] + 1) % 10))
    plain = WitchesBrew(eps=16 / 255, budget=0.05, **TINY).craft(x, y, goal=goal, seed=0)
    richer = WitchesBrew(eps=16 / 255, budget=0.05, ensemble=2, retrain_rounds=1, **TINY)
    poisons = richer.craft(x, y, goal=goal, seed=0)
    assert torch.equal(poisons.indices, plain.indices)  # same random selection, different optimisation
    assert not torch.allclose(poisons.images, plain.images)
    poisons.validate(x, y)
    assert poisons.perturbation_norms(x)[0].max() <= 16 / 255 + 1e-5
    again = richer.craft(x, y, goal=goal, seed=0)
    assert torch.equal(again.images, poisons.images)


def _victim(poisons, seed):
    """A fresh victim trained from scratch by the harness (Lightning Trainer on PoisonedDataModule)."""
    import tempfile
    from pathlib import Path

    from lightning_defense.evaluate import Defense, EvaluationConfig, attack_success, train_victim

    config = EvaluationConfig(
        data={"class_path": "lightning_defense.datamodules.DigitsDataModule",
              "init_args": {"image_size": 8, "batch_size": 64, "seed": 0}},
        attacks=[{"name": "witches_brew"}],
        model={"backbone": "small_cnn", "backbone_kwargs": {"width": 16}, "lr": 0.05, "crop_padding": 2, "flip": False},
        trainer={"accelerator": "cpu", "devices": 1, "max_epochs": 4, "deterministic": True},
    )
    with tempfile.TemporaryDirectory() as root:
        model, data, accuracy = train_victim(config, Defense("none"), poisons, seed, Path(root))
    with torch.no_grad():
        p_adversarial = model(poisons.target_images).softmax(1)[0, int(poisons.adversarial_labels[0])].item()
    return attack_success(model, poisons, data.test_set, accuracy, accuracy), p_adversarial, accuracy


def test_succeeds_on_a_fresh_victim_where_random_noise_does_not():
    """Witches' Brew flips a digits target on a victim retrained from scratch; random noise does not.

    Setting (configs/digits/poison_witches_brew.yaml): 8x8 digits, l_inf 64/255, 9% budget (113 poisons, about
    the whole adversarial class), 60 signed-Adam steps with the surrogate retrained 3 times, 4-epoch victims.
    It is the setting where the attack works at all on digits, and only on some targets: 1 of the 4 targets
    tried (goal seeds 1, 4, 5, 6) flips there, this one (test digit 8 -> 4, goal seed 1; 3 of 3 victim seeds,
    p(4) 0.50-0.85, vs p(4) 0.12-0.36 and no flip with random noise). Victims trained 15 epochs do not flip
    (p(4) 0.17-0.43 vs 0.004 with noise). See BENCHMARKS.md. The victim seed (2) differs from the surrogate's (1).
    """
    from lightning_defense.datamodules import DigitsDataModule

    dm = DigitsDataModule(image_size=8)
    dm.setup()
    x, y = dm.train_tensors()
    xt, yt = dm.test_set.tensors()
    eps = 64 / 255
    attack = WitchesBrew(eps=eps, budget=0.09, steps=60, restarts=1, retrain_rounds=3, backbone_kwargs={"width": 16},
                         surrogate_epochs=10, progress=False)
    goal = attack.sample_goal(xt, yt, num_classes=10, seed=1)
    assert (goal.target_label, goal.adversarial_label) == (8, 4)
    poisons = attack.craft(x, y, goal=goal, seed=1)
    noise = random_sign_control(poisons, x, eps, 1, target_images=poisons.target_images,
                                target_labels=poisons.target_labels, adversarial_labels=poisons.adversarial_labels)
    brewed_success, brewed_p, brewed_acc = _victim(poisons, seed=2)
    noise_success, noise_p, noise_acc = _victim(noise, seed=2)
    print(f"p(adversarial | target): witches' brew {brewed_p:.3f}, random noise {noise_p:.3f}")
    assert brewed_success == 1.0 and noise_success == 0.0
    assert brewed_p > noise_p + 0.1
    assert min(brewed_acc, noise_acc) > 0.85  # the victims are otherwise accurate (clean-label poisoning)

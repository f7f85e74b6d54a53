"""Poison Frogs and Bullseye Polytope: bound, budget, feature collision, and success on a transfer victim.

The transfer victim is the papers' setting: a feature extractor pretrained on clean digits and frozen,
and a linear head (logistic regression) fitted on the poisoned training set's features.
"""

import pytest
import torch

from tests.attacks.conftest import check_targeted_poisons

from lightning_defense.attacks import (
    AttackGoal,
    BullseyePolytope,
    FeatureCollisionNoiseControl,
    PoisonFrogs,
    train_surrogate,
)
from lightning_defense.attacks.feature_collision import extract_features, fit_linear_head

# Digits need a larger bound and budget than the papers' CIFAR-10 (8-16/255, 5-25 poisons): at 16/255 the
# 16x16 one-channel digits leave too little room to move features (1/5 successes, see BENCHMARKS.md).
EPS, BUDGET, STEPS = 32 / 255, 0.03, 150
TARGET_SEEDS = range(100, 105)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def extractor(digits16):
    """A small CNN pretrained on the clean digits, then frozen: the fixed feature extractor."""
    x, y, _, _ = digits16
    model = train_surrogate(x, y, backbone_kwargs={"width": 8}, epochs=6, seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("cls,norm,eps", [(PoisonFrogs, "linf", 16 / 255), (BullseyePolytope, "l2", 0.5)])
def test_within_bound_budget_and_adversarial_class(cls, norm, eps, small_split):
    x, y = small_split
    attack = cls(eps=eps, norm=norm, budget=0.05, steps=5, backbone_kwargs={"width": 4}, extractor_epochs=1,
                 progress=False)
    check_targeted_poisons(attack, x, y, eps, norm)


@pytest.mark.parametrize("cls", [PoisonFrogs, BullseyePolytope])
def test_features_move_onto_the_target(cls, extractor, digits16):
    x, y, xt, yt = digits16
    attack = cls(eps=EPS, budget=0.01, steps=60, extractor=extractor, progress=False)
    goal = attack.sample_goal(xt, yt, num_classes=10, seed=100)
    poisons = attack.craft(x, y, goal=goal, seed=0)
    with torch.no_grad():
        target = extract_features(extractor, goal.target_image[None])
        clean = extract_features(extractor, x[poisons.indices])
        poisoned = extract_features(extractor, poisons.images)
    if cls is BullseyePolytope:  # the mean of the poisons' features is what collides
        before, after = (clean.mean(0) - target).norm(), (poisoned.mean(0) - target).norm()
    else:  # each poison collides on its own
        before, after = (clean - target).norm(dim=1).mean(), (poisoned - target).norm(dim=1).mean()
    assert after < 0.5 * before, (float(before), float(after))
    assert not any(p.requires_grad for p in extractor.parameters())  # the extractor stays as it was


def _transfer_success(extractor, digits16, make_poisons) -> tuple[int, float]:
    """Targets sent to the adversarial class by a head fitted on poisoned features, and its mean test accuracy."""
    x, y, xt, yt = digits16
    wins, accuracies = 0, []
    for trial, seed in enumerate(TARGET_SEEDS):
        goal = PoisonFrogs(eps=EPS).sample_goal(xt, yt, num_classes=10, seed=seed)
        indices, images = make_poisons(goal, trial)
        poisoned = x.clone()
        poisoned[indices] = images
        with torch.no_grad():
            head = fit_linear_head(extract_features(extractor, poisoned), y, 10)
            wins += int(head(extract_features(extractor, goal.target_image[None])).argmax()) == goal.adversarial_label
            accuracies.append((head(extract_features(extractor, xt)).argmax(1) == yt).float().mean().item())
    return wins, sum(accuracies) / len(accuracies)


@pytest.mark.parametrize("cls", [PoisonFrogs, BullseyePolytope])
def test_transfer_attack_succeeds_and_random_noise_does_not(cls, extractor, digits16):
    x, y, _, _ = digits16

    def crafted(goal, trial):
        poisons = cls(eps=EPS, budget=BUDGET, steps=STEPS, extractor=extractor, progress=False).craft(
            x, y, goal=goal, seed=trial)
        assert poisons.perturbation_norms(x)[0].max() <= EPS + 1e-5
        return poisons.indices, poisons.images

    def noise(goal, trial):  # the same budget of adversarial-class images, uniform noise in the same bound
        poisons = FeatureCollisionNoiseControl(eps=EPS, budget=BUDGET, extractor=extractor, progress=False).craft(
            x, y, goal=goal, seed=trial)
        return poisons.indices, poisons.images

    wins, accuracy = _transfer_success(extractor, digits16, crafted)
    noise_wins, _ = _transfer_success(extractor, digits16, noise)
    assert wins >= 3, f"{cls.name}: only {wins}/5 targets flipped"
    assert noise_wins <= 1, f"random noise flipped {noise_wins}/5 targets: the test would not tell"
    assert accuracy > 0.9  # the attack is targeted: clean accuracy stays


def test_fit_linear_head_learns_separable_features():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 5, generator=generator) * 5
    labels = torch.arange(3).repeat(20)
    features = centres[labels] + torch.randn(60, 5, generator=generator) + 100  # offset: standardisation folds back
    head = fit_linear_head(features, labels, 3, steps=100)
    assert (head(features).argmax(1) == labels).float().mean() > 0.95
    with pytest.raises(ValueError, match="features must be"):
        fit_linear_head(features, labels[:-1], 3)


def test_argument_errors(small_split):
    x, y = small_split
    with pytest.raises(ValueError, match="steps must be an int >= 1; got 0"):
        BullseyePolytope(steps=0)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        PoisonFrogs(beta=-1.0)
    with pytest.raises(ValueError, match="extractor must be an ImageClassifier"):
        PoisonFrogs(extractor=torch.nn.Linear(2, 2))
    attack = BullseyePolytope(budget=0.5, steps=1, extractor_epochs=1, backbone_kwargs={"width": 4}, progress=False)
    with pytest.raises(ValueError, match="needs goal with target_image, adversarial_label"):
        attack.craft(x, y, seed=0)
    goal = AttackGoal(x[0], int(y[0]), int((y[0] + 1) % 10))
    with pytest.raises(ValueError, match=r"budget asks for 100 poisons but only \d+ training images of the adversarial"):
        attack.craft(x, y, goal=goal, seed=0)


@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 0.5)])
def test_noise_control_perturbs_the_attacks_samples_at_random(norm, eps, extractor, digits16):
    """The control takes Bullseye's goal, samples and bound; its deltas are random draws, not a collision."""
    x, y, xt, yt = digits16
    attack = BullseyePolytope(eps=eps, norm=norm, budget=BUDGET, steps=60, extractor=extractor, progress=False)
    control = FeatureCollisionNoiseControl(eps=eps, norm=norm, budget=BUDGET, extractor=extractor, progress=False)
    goal = attack.sample_goal(xt, yt, num_classes=10, seed=101)
    assert control.sample_goal(xt, yt, num_classes=10, seed=101).target_index == goal.target_index
    poisons, noise = attack.craft(x, y, goal=goal, seed=3), control.craft(x, y, goal=goal, seed=3)
    assert torch.equal(noise.indices, poisons.indices) and noise.kind == "targeted"
    assert noise.adversarial_labels.tolist() == [goal.adversarial_label]
    noise.validate(x, y)
    linf, l2 = noise.perturbation_norms(x)
    size = linf if norm == "linf" else l2
    assert size.max() <= eps + 1e-5 and size.min() > 0.5 * eps  # full-size draws, clipped only by the box
    delta = noise.images - x[noise.indices]
    assert delta.flatten(1).std(1).min() > 0  # per-pixel noise, not a constant shift
    assert not torch.equal(delta[0], delta[1])  # each sample its own draw
    # Random noise leaves the poisons' mean feature far from the target; Bullseye's collision does not.
    assert float(noise.metadata["collision_loss"]) > 4 * float(poisons.metadata["collision_loss"])
    again = control.craft(x, y, goal=goal, seed=3)
    assert torch.equal(again.images, noise.images)
    assert not torch.equal(control.craft(x, y, goal=goal, seed=4).images, noise.images)


def test_evaluate_with_a_transfer_victim(extractor, tmp_path, monkeypatch):
    """``evaluate`` trains the transfer victim: the attack's extractor, frozen (BatchNorm included), a new head.

    Bullseye's extractor is trained and written by the harness (``output_dir/extractors``); the control
    reads the same network from a user-given ``extractor_path``. Bullseye must flip targets that the
    noise control (same budget, bound and victim) does not. The head is trained by SGD for a few epochs,
    not fitted to convergence like :func:`fit_linear_head`, so this uses a 5% budget.
    """
    from safetensors.torch import load_file, save_file

    from lightning_defense.evaluate import EvaluationConfig, evaluate
    from lightning_defense.evaluate import protocol as evaluation_module

    given = tmp_path / "extractor.safetensors"
    save_file({k: v.contiguous() for k, v in extractor.backbone.state_dict().items()}, str(given))
    victim = {"transfer": True,
              "model": {"backbone_kwargs": {"width": 8}, "crop_padding": 0, "lr": 0.5, "milestones": []},
              "trainer": {"max_epochs": 5, "limit_train_batches": 1.0}}
    settings = {"eps": EPS, "budget": 0.05, "steps": STEPS, "backbone_kwargs": {"width": 8}, "extractor_epochs": 6,
                "progress": False}
    config = EvaluationConfig(
        data={"class_path": "lightning_defense.datamodules.DigitsDataModule",
              "init_args": {"image_size": 16, "batch_size": 128}},
        attacks=[{"name": "bullseye", "class_path": "lightning_defense.attacks.BullseyePolytope",
                  "init_args": settings, "victim": victim},
                 {"name": "noise", "class_path": "lightning_defense.attacks.FeatureCollisionNoiseControl",
                  "init_args": {**settings, "extractor_path": str(given)}, "victim": victim}],
        model={"backbone": "small_cnn", "backbone_kwargs": {"width": 4}, "crop_padding": 0, "flip": False},
        trainer={"accelerator": "cpu", "devices": 1, "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 0},
        trials=3, seed=1, output_dir=str(tmp_path / "eval"), progress=False)
    real, victims = evaluation_module.train_victim, []

    def keep(*args, **kwargs):
        result = real(*args, **kwargs)
        victims.append((kwargs.get("extractor"), result[0]))
        return result

    monkeypatch.setattr(evaluation_module, "train_victim", keep)
    summary, table = evaluate(config)
    cells = {s["attack"]: s for s in summary}
    written = tmp_path / "eval" / "extractors" / "bullseye.safetensors"
    assert written.is_file() and not (tmp_path / "eval" / "extractors" / "noise.safetensors").exists()
    # The harness's extractor is the same network the fixture trained (same recipe and seed).
    assert all(torch.equal(v, extractor.backbone.state_dict()[k]) for k, v in load_file(str(written)).items())
    transfer = [(path, model) for path, model in victims if path is not None]
    assert {path for path, _ in transfer} == {str(written), str(given)} and len(transfer) == 6
    for path, model in transfer:  # frozen: every weight and BatchNorm statistic is still the extractor's
        state, own = load_file(path), model.backbone.state_dict()
        assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("fc.")), path
        assert not torch.equal(own["fc.weight"], state["fc.weight"])  # the head was trained afresh
    assert cells["bullseye"]["accuracy_mean"] > 0.85 and cells["noise"]["accuracy_mean"] > 0.85
    assert cells["noise"]["success_mean"] == 0.0
    assert cells["bullseye"]["success_mean"] > 0.0, table

    # A rerun resumes everything: no victim, no crafting, no extractor is redone.
    files = sorted((tmp_path / "eval").glob("poisons/*/*.safetensors")) + [written]
    stamps = [f.stat().st_mtime_ns for f in files]
    again = evaluation_module.Evaluation(config)
    again.run()
    assert again.executed == 0 and [f.stat().st_mtime_ns for f in files] == stamps and len(files) == 7

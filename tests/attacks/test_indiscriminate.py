"""URP, LSP (Yu et al.'s and the class-wise variant), AR and EM: bounds, budgets, reproducibility, argument
errors, LSP's per-sample separable points, and LSP's accuracy drop."""

import math

import pytest
import torch

from lightning_defense.attacks import (
    AutoregressivePerturbation,
    ClasswiseLinearSeparablePerturbation,
    ErrorMinimizingNoise,
    LinearSeparablePerturbation,
    LSPNoiseControl,
    UniversalRandomPerturbation,
    train_surrogate,
)
from tests.attacks.conftest import accuracy_of

ATTACKS = {
    "urp": lambda **kw: UniversalRandomPerturbation(eps=16 / 255, **kw),
    "urp_l2": lambda **kw: UniversalRandomPerturbation(eps=1.0, norm="l2", **kw),
    "lsp": lambda **kw: LinearSeparablePerturbation(eps=16 / 255 * 16, patch_size=4, **kw),  # eps_inf * sqrt(d)
    "lsp_linf": lambda **kw: LinearSeparablePerturbation(eps=16 / 255, norm="linf", patch_size=4, **kw),
    "classwise_lsp": lambda **kw: ClasswiseLinearSeparablePerturbation(eps=16 / 255, patch_size=4, **kw),
    "ar": lambda **kw: AutoregressivePerturbation(eps=1.0, progress=False, **kw),
    "ar_linf": lambda **kw: AutoregressivePerturbation(eps=8 / 255, norm="linf", progress=False, **kw),
    "em": lambda **kw: ErrorMinimizingNoise(eps=8 / 255, backbone_kwargs={"width": 4}, train_steps=2, perturb_steps=3,
                                            max_rounds=2, batch_size=100, progress=False, **kw),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("budget", [1.0, 0.1])
def test_within_bound_and_budget(name, budget, small_split):
    x, y = small_split
    attack = ATTACKS[name](budget=budget)
    poisons = attack.craft(x, y, seed=3)
    assert poisons.kind == "indiscriminate" and poisons.metadata["attack"] == attack.name
    assert len(poisons) == (len(x) if budget == 1.0 else round(budget * len(x)))
    assert len(poisons.indices.unique()) == len(poisons)
    poisons.validate(x, y)  # indices, [0,1] pixels, clean labels, bound with 8-bit slack
    linf, l2 = poisons.perturbation_norms(x)
    norms = linf if attack.norm == "linf" else l2
    assert norms.max() <= attack.eps + 1e-5  # no slack at all on freshly crafted poisons
    assert (linf > 0).float().mean() > 0.9  # the poisons really are perturbed
    applied = poisons.apply(x)
    untouched = torch.ones(len(x), dtype=torch.bool)
    untouched[poisons.indices] = False
    assert torch.equal(applied[untouched], x[untouched])  # only the budget changed


@pytest.mark.parametrize("name", ["urp", "lsp", "classwise_lsp", "ar"])
def test_seeded_and_reproducible(name, small_split):
    x, y = small_split
    a, b, c = (ATTACKS[name](budget=0.5).craft(x, y, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)


@pytest.mark.parametrize("name", ["urp", "classwise_lsp"])
def test_class_wise_patterns_are_shared_within_a_class(name, small_split):
    x, y = small_split
    poisons = ATTACKS[name]().craft(x, y, seed=0)
    delta = poisons.images - x
    inside = (x > 16 / 255) & (x < 1 - 16 / 255)  # pixels the [0,1] clip does not touch
    same_class = (y == y[0]).nonzero().flatten()
    both = inside[same_class[0]] & inside[same_class[1]]
    assert torch.allclose(delta[same_class[0]][both], delta[same_class[1]][both], atol=1e-6)


def test_lsp_gives_each_sample_its_own_linearly_separable_point():
    """Yu et al.: per-sample points from class-wise clusters, patch-wise constant, L2 norm eps_inf * sqrt(d)."""
    n, shape, eps = 2000, (3, 16, 16), 8 / 255 * math.sqrt(3 * 16 * 16)
    x, y = torch.full((n, *shape), 0.5), torch.arange(n) % 10  # mid-gray: the [0, 1] clip never acts
    poisons = LinearSeparablePerturbation(eps=eps, patch_size=8).craft(x, y, seed=0)
    delta = poisons.images - x
    assert delta.shape == x.shape and torch.equal(poisons.indices, torch.arange(n))
    linf, l2 = poisons.perturbation_norms(x)
    assert torch.allclose(l2, torch.full((n,), eps, dtype=torch.float64), atol=1e-4)  # on the L2 sphere
    assert linf.max() < 0.5  # so the clip did not act
    cells = delta[:, :, ::8, ::8]  # one value per 8x8 patch and channel: k = 3 * 2 * 2 coordinates
    assert torch.equal(torch.nn.functional.interpolate(cells, scale_factor=8, mode="nearest"), delta)
    # Every sample differs from every other sample of its class.
    same_class = delta[y == 3].flatten(1)
    gaps = torch.cdist(same_class, same_class) + torch.eye(len(same_class)) * 1e9
    assert gaps.min() > 1e-3 * eps
    # A linear classifier on the perturbations alone separates the classes, on samples it was not fit to.
    features = torch.cat([delta.flatten(1).double(), torch.ones(n, 1, dtype=torch.float64)], dim=1)
    onehot = torch.nn.functional.one_hot(y, 10).double()
    weights = torch.linalg.lstsq(features[: n // 2], onehot[: n // 2]).solution
    assert ((features[n // 2:] @ weights).argmax(1) == y[n // 2:]).all()


def test_lsp_noise_control_has_lsps_norm_and_patches_but_no_class_structure():
    n, shape, eps = 2000, (3, 16, 16), 8 / 255 * math.sqrt(3 * 16 * 16)
    x, y = torch.full((n, *shape), 0.5), torch.arange(n) % 10
    poisons = LSPNoiseControl(eps=eps, patch_size=8).craft(x, y, seed=0)
    delta = poisons.images - x
    _, l2 = poisons.perturbation_norms(x)
    assert torch.allclose(l2, torch.full((n,), eps, dtype=torch.float64), atol=1e-4)
    cells = delta[:, :, ::8, ::8]
    assert torch.equal(torch.nn.functional.interpolate(cells, scale_factor=8, mode="nearest"), delta)
    # The same held-out linear classifier that separates LSP's classes is at chance here.
    features = torch.cat([delta.flatten(1).double(), torch.ones(n, 1, dtype=torch.float64)], dim=1)
    onehot = torch.nn.functional.one_hot(y, 10).double()
    weights = torch.linalg.lstsq(features[: n // 2], onehot[: n // 2]).solution
    assert ((features[n // 2:] @ weights).argmax(1) == y[n // 2:]).double().mean() < 0.2


def test_lsp_needs_a_hypercube_vertex_per_class(small_split):
    x, y = small_split  # 1 x 16 x 16: patch 16 leaves one coordinate, 2 vertices for 10 classes
    with pytest.raises(ValueError, match="1 coordinates give 2 vertices for 10 classes; lower patch_size"):
        LinearSeparablePerturbation(eps=1.0, patch_size=16).craft(x, y)


def test_ar_filter_annihilates_its_own_class():
    """Sandoval-Segura et al.'s premise: the class filter [beta, -1] maps that class's AR noise to ~0."""
    attack = AutoregressivePerturbation(eps=1.0, progress=False)
    x, y = torch.full((4, 1, 12, 12), 0.5), torch.tensor([0, 0, 1, 1])
    delta = attack.perturbation(x, y, torch.Generator().manual_seed(0))
    beta = attack.filters(2, 1, torch.Generator().manual_seed(0))
    windows = torch.nn.functional.unfold(delta, 3)  # (n, 9, positions), row-major 3x3 windows
    residual_own = (windows[:, :8] * beta[0, 0, :, None]).sum(1) - windows[:, 8]
    assert residual_own[:2].abs().max() < 1e-5 * delta.abs().max()
    assert residual_own[2:].abs().max() > 1e-2 * delta.abs().max()


def test_argument_errors():
    with pytest.raises(ValueError, match="eps must be"):
        UniversalRandomPerturbation(eps=0)
    with pytest.raises(ValueError, match="norm must be one of"):
        LinearSeparablePerturbation(eps=0.1, norm="l1")
    with pytest.raises(ValueError, match=r"budget must be .* got 1.5"):
        AutoregressivePerturbation(eps=1.0, budget=1.5)
    with pytest.raises(ValueError, match="patch_size"):
        LinearSeparablePerturbation(eps=0.1, patch_size=0)
    with pytest.raises(ValueError, match="patch_size"):
        ClasswiseLinearSeparablePerturbation(eps=0.1, patch_size=0)
    with pytest.raises(ValueError, match="class_sep must be a number > 0"):
        LinearSeparablePerturbation(eps=0.1, class_sep=0)
    with pytest.raises(ValueError, match="window"):
        AutoregressivePerturbation(eps=1.0, window=1)
    with pytest.raises(ValueError, match="perturb_steps"):
        ErrorMinimizingNoise(eps=0.1, perturb_steps=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        UniversalRandomPerturbation(eps=0.1).craft(torch.full((2, 1, 8, 8), 2.0), torch.tensor([0, 1]))


def test_lsp_makes_digits_unlearnable(digits16):
    """Test accuracy after training on LSP poisons is far below clean training with the same recipe and seed."""
    x, y, xt, yt = digits16
    poisons = LinearSeparablePerturbation(eps=32 / 255 * 16, patch_size=8).craft(x, y, seed=0)  # 32/255 * sqrt(256)
    settings = dict(backbone_kwargs={"width": 8}, epochs=6, seed=1)
    clean = accuracy_of(train_surrogate(x, y, **settings), xt, yt)
    poisoned = accuracy_of(train_surrogate(poisons.apply(x), y, **settings), xt, yt)
    assert clean > 0.85, clean
    assert poisoned < clean - 0.3, (clean, poisoned)

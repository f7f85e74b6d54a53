"""Tests for randomized-smoothing certificates, against independent hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm

from lightning_defense.certify import (
    ABSTAIN,
    certified_accuracy,
    certify,
    certify_batch,
    certify_rab,
    certify_rab_batch,
    linf_to_l2,
    lower_confidence_bound,
    per_sample_radius,
    plot_certified_accuracy,
    predict,
    two_class_radius,
    upper_confidence_bound,
)
from lightning_defense.certify.smoothing import _certified_accuracy_figure


def cp_lower_by_bisection(k: int, n: int, alpha: float) -> float:
    """Exact lower bound: the p with P[Binom(n, p) >= k] = alpha, found by bisection."""
    if k == 0:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if binom.sf(k - 1, n, mid) < alpha:  # tail probability increases with p
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def cp_upper_by_bisection(k: int, n: int, alpha: float) -> float:
    """Exact upper bound: the p with P[Binom(n, p) <= k] = alpha, found by bisection."""
    if k == n:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if binom.cdf(k, n, mid) > alpha:  # lower tail decreases with p
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def two_sided_binom_pvalue(n_a: int, n_b: int) -> float:
    """Two-sided p-value of n_a successes in n_a + n_b trials against p = 1/2 (symmetric)."""
    small = min(n_a, n_b)
    return min(1.0, 2.0 * binom.cdf(small, n_a + n_b, 0.5)) if n_a != n_b else 1.0


# --------------------------------------------------------------------------- lower bound


@pytest.mark.parametrize(
    ("k", "n", "alpha"), [(7, 10, 0.05), (50, 100, 0.001), (1, 3, 0.1), (99, 100, 0.01)]
)
def test_lower_confidence_bound_matches_bisection(k: int, n: int, alpha: float) -> None:
    expected = cp_lower_by_bisection(k, n, alpha)
    assert lower_confidence_bound(k, n, alpha) == pytest.approx(expected, abs=1e-9)
    assert 0.0 < expected < k / n


@pytest.mark.parametrize(("n", "alpha"), [(1, 0.05), (10, 0.001), (250, 0.001)])
def test_lower_confidence_bound_all_votes_agree_is_alpha_root(n: int, alpha: float) -> None:
    # Hong et al.: when all m models agree, pA = alpha ** (1 / m).
    assert lower_confidence_bound(n, n, alpha) == pytest.approx(alpha ** (1.0 / n), rel=1e-12)


def test_lower_confidence_bound_zero_votes_is_zero() -> None:
    assert lower_confidence_bound(0, 20, 0.01) == 0.0


# --------------------------------------------------------------------------- certify


def test_certify_radius_from_clopper_pearson() -> None:
    cert = certify(np.array([1, 8, 1]), np.array([2, 95, 3]), sigma=0.25, alpha=0.001)
    p_a = cp_lower_by_bisection(95, 100, 0.001)
    assert cert.prediction == 1
    assert cert.p_a == pytest.approx(p_a, abs=1e-9)
    assert cert.radius == pytest.approx(0.25 * norm.ppf(p_a), abs=1e-8)
    assert (cert.p_a, cert.radius) == pytest.approx((0.8446, 0.2534), abs=1e-4)


def test_certify_hong_closed_form_and_per_sample_radius() -> None:
    m, sigma, alpha = 250, 0.5, 0.001  # m models, all voting for class 1
    cert = certify([0, 10, 0], [0, m, 0], sigma=sigma, alpha=alpha)
    p_a = alpha ** (1.0 / m)
    assert cert.prediction == 1
    assert cert.p_a == pytest.approx(p_a, rel=1e-12)
    assert cert.radius == pytest.approx(sigma * norm.ppf(p_a), rel=1e-9)
    # r poisoned training samples (here 40, unrelated to the m = 250 models), each moved by ||delta||_2:
    # sqrt(r) * ||delta||_2 < sigma * Phi^-1(pA), so ||delta||_2 < sigma * Phi^-1(alpha^(1/m)) / sqrt(r).
    r = 40
    assert per_sample_radius(cert.radius, r) == pytest.approx(
        sigma * norm.ppf(alpha ** (1.0 / m)) / math.sqrt(r), rel=1e-9
    )
    assert per_sample_radius(cert.radius, r) != pytest.approx(sigma * norm.ppf(p_a) / math.sqrt(m))


def test_certify_class_comes_from_counts0_not_counts() -> None:
    cert = certify([0, 10, 0], [90, 10, 0], sigma=1.0, alpha=0.001)
    assert cert.prediction == ABSTAIN
    assert cert.radius == 0.0
    assert cert.p_a == pytest.approx(cp_lower_by_bisection(10, 100, 0.001), abs=1e-9)


def test_certify_abstains_below_one_half_but_reports_p_a() -> None:
    cert = certify([6, 4], [55, 45], sigma=0.5, alpha=0.001)
    expected = cp_lower_by_bisection(55, 100, 0.001)
    assert expected < 0.5
    assert cert == (ABSTAIN, pytest.approx(expected, abs=1e-9), 0.0)


def test_certify_tie_in_counts0_goes_to_smaller_class() -> None:
    # Tie between classes 0 and 1: class 0 is chosen, so all-zero-votes counts for class 0
    # certify while the same counts on class 1 abstain.
    assert certify([5, 5, 0], [100, 0, 0], sigma=1.0, alpha=0.01).prediction == 0
    tie_other = certify([5, 5, 0], [0, 100, 0], sigma=1.0, alpha=0.01)
    assert tie_other.prediction == ABSTAIN
    assert tie_other.p_a == 0.0


def test_certify_accepts_torch_tensors() -> None:
    from_torch = certify(torch.tensor([1, 8, 1]), torch.tensor([2, 95, 3]), 0.25, 0.001)
    from_numpy = certify(np.array([1, 8, 1]), np.array([2, 95, 3]), 0.25, 0.001)
    assert from_torch == from_numpy


def test_certify_batch_equals_per_row_certify() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(4, 0.3), size=30)
    counts0 = np.stack([rng.multinomial(10, p) for p in probs])
    counts = np.stack([rng.multinomial(200, p) for p in probs])
    batch = certify_batch(counts0, counts, sigma=0.5, alpha=0.001)
    rows = [certify(c0, c, sigma=0.5, alpha=0.001) for c0, c in zip(counts0, counts)]
    assert batch.prediction.shape == batch.p_a.shape == batch.radius.shape == (30,)
    np.testing.assert_array_equal(batch.prediction, [r.prediction for r in rows])
    np.testing.assert_allclose(batch.p_a, [r.p_a for r in rows], rtol=1e-12)
    np.testing.assert_allclose(batch.radius, [r.radius for r in rows], rtol=1e-12)
    # The random draw covers both outcomes.
    assert (batch.prediction == ABSTAIN).any() and (batch.prediction >= 0).any()


# --------------------------------------------------------------------------- predict


@pytest.mark.parametrize(
    ("counts", "alpha", "expected"),
    [
        ([60, 40, 0], 0.05, ABSTAIN),  # p about 0.057
        ([62, 38, 0], 0.05, 0),  # p about 0.021
        ([30, 10, 60], 0.01, 2),  # top two 60 vs 30: p about 0.002; the 10 is ignored
        ([30, 10, 60], 0.001, ABSTAIN),
        ([50, 50, 0], 0.5, ABSTAIN),  # tied top two never pass
    ],
)
def test_predict_binomial_test_of_top_two(counts: list[int], alpha: float, expected: int) -> None:
    ordered = sorted(counts, reverse=True)
    pvalue = two_sided_binom_pvalue(ordered[0], ordered[1])
    assert (pvalue <= alpha) == (expected != ABSTAIN)
    assert predict(np.array(counts), alpha) == expected


def test_predict_torch_counts() -> None:
    assert predict(torch.tensor([0, 3, 40]), 0.001) == 2


# --------------------------------------------------------------------------- RAB


@pytest.mark.parametrize(("k", "n", "alpha"), [(3, 10, 0.05), (0, 30, 0.001), (29, 30, 0.0001), (50, 100, 0.01)])
def test_upper_confidence_bound_matches_bisection(k: int, n: int, alpha: float) -> None:
    assert upper_confidence_bound(k, n, alpha) == pytest.approx(cp_upper_by_bisection(k, n, alpha), abs=1e-9)
    assert upper_confidence_bound(k, n, alpha) == pytest.approx(1 - lower_confidence_bound(n - k, n, alpha), abs=1e-12)
    assert upper_confidence_bound(n, n, alpha) == 1.0


def rab_by_hand(counts0, counts, sigma, alpha):
    """RAB's certificate from bisection bounds: K simultaneous bounds at alpha / K (one at alpha for K = 2)."""
    num_classes, n = len(counts), sum(counts)
    level = alpha if num_classes == 2 else alpha / num_classes
    c_a = int(np.argmax(counts0))
    p_a = cp_lower_by_bisection(counts[c_a], n, level)
    p_b = min(1 - p_a, max(cp_upper_by_bisection(counts[c], n, level) for c in range(num_classes) if c != c_a))
    if p_a <= p_b:
        return ABSTAIN, p_a, p_b, 0.0
    return c_a, p_a, p_b, sigma / 2 * (norm.ppf(p_a) - norm.ppf(p_b))


@pytest.mark.parametrize(
    ("counts0", "counts"),
    [
        ([0, 5, 0], [0, 30, 0]),  # all votes agree
        ([1, 4, 0, 0], [6, 20, 2, 2]),  # votes spread: pB from the runner-up's upper bound
        ([2, 8, 0, 0, 0, 0, 0, 0, 0, 0], [0, 27, 1, 0, 0, 2, 0, 0, 0, 0]),
        ([3, 2], [14, 16]),  # binary, abstains
        ([3, 2], [28, 2]),  # binary: pB = 1 - pA
        ([1, 4, 0], [25, 5, 0]),  # c_A from counts0 has the fewer estimation votes: abstain
    ],
)
def test_certify_rab_matches_hand_computation(counts0, counts) -> None:
    sigma, alpha = 0.5, 0.001
    prediction, p_a, p_b, radius = rab_by_hand(counts0, counts, sigma, alpha)
    cert = certify_rab(counts0, counts, sigma=sigma, alpha=alpha)
    assert cert.prediction == prediction
    assert cert.p_a == pytest.approx(p_a, abs=1e-9)
    assert cert.p_b == pytest.approx(p_b, abs=1e-9)
    assert cert.radius == pytest.approx(radius, abs=1e-8)
    if prediction != ABSTAIN:
        assert cert.radius == pytest.approx(two_class_radius(cert.p_a, cert.p_b, sigma), rel=1e-12)


def test_certify_rab_binary_is_the_one_sided_bound_and_ten_classes_pay_bonferroni() -> None:
    n, sigma, alpha = 30, 0.25, 0.001
    binary = certify_rab([5, 0], [n, 0], sigma=sigma, alpha=alpha)
    assert binary.p_a == pytest.approx(alpha ** (1 / n), rel=1e-12)
    assert binary.p_b == pytest.approx(1 - binary.p_a, rel=1e-12)
    assert binary.radius == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)), rel=1e-9)
    ten = certify_rab([5] + [0] * 9, [n] + [0] * 9, sigma=sigma, alpha=alpha)
    assert ten.p_a == pytest.approx((alpha / 10) ** (1 / n), rel=1e-12)
    assert ten.radius == pytest.approx(sigma * norm.ppf((alpha / 10) ** (1 / n)), rel=1e-9)


def test_certify_rab_batch_equals_per_row() -> None:
    rng = np.random.default_rng(1)
    counts0 = rng.integers(0, 6, size=(25, 4))
    counts0[:, 2] += 1
    counts = rng.multinomial(40, [0.05, 0.1, 0.8, 0.05], size=25)
    batch = certify_rab_batch(counts0, torch.as_tensor(counts), sigma=0.3, alpha=0.01)
    assert (batch.radius > 0).any() and (batch.prediction == ABSTAIN).any()
    for t in range(25):
        one = certify_rab(counts0[t], counts[t], sigma=0.3, alpha=0.01)
        assert (one.prediction, one.p_a, one.p_b, one.radius) == pytest.approx(
            (batch.prediction[t], batch.p_a[t], batch.p_b[t], batch.radius[t]))


def test_certify_rab_errors() -> None:
    with pytest.raises(ValueError, match=r"RAB's certificate needs K >= 2 classes"):
        certify_rab([3], [3], sigma=1.0, alpha=0.01)
    with pytest.raises(ValueError, match=r"sigma must be > 0"):
        certify_rab([3, 0], [3, 0], sigma=0.0, alpha=0.01)
    with pytest.raises(ValueError, match=r"alpha must be in the open interval"):
        certify_rab_batch([[3, 0]], [[3, 0]], sigma=1.0, alpha=1.0)
    with pytest.raises(ValueError, match=r"k must be an integer in \[0, n\]"):
        upper_confidence_bound(5, 3, 0.01)


# --------------------------------------------------------------------------- radii


def test_two_class_radius_formula_and_consistency_with_certify() -> None:
    expected = 0.25 * (norm.ppf(0.9) - norm.ppf(0.05))
    assert two_class_radius(0.9, 0.05, 0.5) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.7316, abs=1e-4)
    # pB = 1 - pA recovers sigma * Phi^-1(pA), the certify radius.
    p_a = 0.87
    assert two_class_radius(p_a, 1 - p_a, 0.7) == pytest.approx(0.7 * norm.ppf(p_a), rel=1e-12)
    arr = two_class_radius(np.array([0.9, 0.6]), np.array([0.1, 0.4]), 1.0)
    np.testing.assert_allclose(arr, [norm.ppf(0.9), norm.ppf(0.6)], rtol=1e-12)


def test_per_sample_radius() -> None:
    assert per_sample_radius(2.0, 4) == pytest.approx(1.0)
    assert per_sample_radius(3.0, 1) == pytest.approx(3.0)
    np.testing.assert_allclose(per_sample_radius(np.array([1.0, 3.0]), 9), [1 / 3, 1.0])


def test_linf_to_l2_matches_hong_appendix_b() -> None:
    assert linf_to_l2(16 / 255, (3, 32, 32)) == pytest.approx(16 / 255 * math.sqrt(3072))
    assert linf_to_l2(16 / 255, (3, 32, 32)) == pytest.approx(3.48, abs=5e-3)
    assert linf_to_l2(8 / 255, (3, 32, 32)) == pytest.approx(1.74, abs=5e-3)
    assert linf_to_l2(0.5, [4]) == pytest.approx(1.0)


# --------------------------------------------------------------------------- evaluation


def test_certified_accuracy_hand_example() -> None:
    radii = np.array([0.0, 0.5, 1.0, 2.0, 0.0])
    correct = np.array([False, True, False, True, True])  # first point abstained
    grid = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    np.testing.assert_allclose(
        certified_accuracy(radii, correct, grid), [0.6, 0.4, 0.2, 0.2, 0.2, 0.0]
    )


def test_certified_accuracy_counts_abstentions_as_wrong() -> None:
    labels = np.array([0, 1, 1])
    batch = certify_batch(
        [[10, 0], [10, 0], [0, 10]], [[100, 0], [50, 50], [0, 100]], sigma=1.0, alpha=0.001
    )
    assert batch.prediction.tolist() == [0, ABSTAIN, 1]
    acc = certified_accuracy(batch.radius, batch.prediction == labels, [0.0, batch.radius[0]])
    np.testing.assert_allclose(acc, [2 / 3, 2 / 3])


def test_plot_certified_accuracy_writes_png(tmp_path) -> None:
    grid = np.linspace(0.0, 1.0, 11)
    curves = {
        "sigma=0.25": (grid, np.clip(0.8 - grid, 0, 1)),
        "sigma=0.5": (torch.tensor(grid), torch.tensor(np.clip(0.6 - grid / 2, 0, 1))),
    }
    out = plot_certified_accuracy(curves, tmp_path / "curve.png", title="CIFAR-10")
    assert out == tmp_path / "curve.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000


def test_plot_steps_and_secondary_axis() -> None:
    fig = _certified_accuracy_figure({"DPA k=10": ([0, 1, 2], [0.9, 0.5, 0.0])}, None, "modified samples", True,
                                     ("inserted + deleted", 2.0))
    ax = fig.axes[0]
    assert ax.get_xlabel() == "modified samples" and ax.lines[0].get_drawstyle() == "steps-post"
    assert [a.get_xlabel() for a in ax.child_axes] == ["inserted + deleted"]
    bottom = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert bottom == [0, 1, 2]  # integer ticks only
    assert list(ax.child_axes[0].get_xticks()) == [0, 2, 4]  # top ticks only where both readings are exact


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5])
def test_bad_alpha_raises(alpha: float) -> None:
    match = r"alpha must be in the open interval \(0, 1\), got"
    with pytest.raises(ValueError, match=match):
        certify([1, 2], [1, 2], sigma=1.0, alpha=alpha)
    with pytest.raises(ValueError, match=match):
        certify_batch([[1, 2]], [[1, 2]], sigma=1.0, alpha=alpha)
    with pytest.raises(ValueError, match=match):
        predict([1, 2], alpha)
    with pytest.raises(ValueError, match=match):
        lower_confidence_bound(1, 2, alpha)


@pytest.mark.parametrize("sigma", [0.0, -1.0])
def test_bad_sigma_raises(sigma: float) -> None:
    with pytest.raises(ValueError, match=r"sigma must be > 0, got -?\d"):
        certify([1, 2], [1, 2], sigma=sigma, alpha=0.01)
    with pytest.raises(ValueError, match=r"sigma must be > 0"):
        two_class_radius(0.9, 0.1, sigma)


def test_bad_counts_raise() -> None:
    with pytest.raises(ValueError, match=r"counts must be non-negative vote counts, got \[3, -1\]"):
        certify([3, 1], [3, -1], sigma=1.0, alpha=0.01)
    with pytest.raises(ValueError, match=r"counts0 must be non-negative"):
        certify_batch([[3, -1]], [[3, 1]], sigma=1.0, alpha=0.01)
    with pytest.raises(ValueError, match=r"counts0 must be a 1-D array .* got shape \(1, 2\)"):
        certify([[3, 1]], [3, 1], sigma=1.0, alpha=0.01)
    with pytest.raises(ValueError, match=r"counts must be a 2-D array .* got shape \(2,\)"):
        certify_batch([[3, 1]], [3, 1], sigma=1.0, alpha=0.01)
    with pytest.raises(ValueError, match=r"counts must be a 1-D array .* got shape \(0,\)"):
        predict([], 0.01)
    with pytest.raises(ValueError, match=r"counts0 and counts must have the same shape"):
        certify([3, 1, 0], [3, 1], sigma=1.0, alpha=0.01)
    with pytest.raises(ValueError, match=r"counts must hold at least one vote \(total n > 0\)"):
        certify([3, 1], [0, 0], sigma=1.0, alpha=0.01)
    with pytest.raises(ValueError, match=r"counts0 must hold at least one vote.*rows \[1\]"):
        certify_batch([[1, 0], [0, 0]], [[1, 0], [1, 0]], sigma=1.0, alpha=0.01)
    with pytest.raises(ValueError, match=r"counts must hold at least one vote"):
        predict([0, 0], 0.01)
    with pytest.raises(ValueError, match=r"counts must hold whole-number vote counts"):
        predict([1.5, 2.0], 0.01)


def test_other_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"k must be an integer in \[0, n\] = \[0, 3\], got 4"):
        lower_confidence_bound(4, 3, 0.01)
    with pytest.raises(ValueError, match=r"n must be an integer >= 1 .* got 0"):
        lower_confidence_bound(0, 0, 0.01)
    with pytest.raises(ValueError, match=r"p_a must be a probability in \[0, 1\], got 1.2"):
        two_class_radius(1.2, 0.1, 1.0)
    with pytest.raises(ValueError, match=r"r must be an integer >= 1 .* got 0"):
        per_sample_radius(1.0, 0)
    with pytest.raises(ValueError, match=r"r must be an integer >= 1 .* got 2.5"):
        per_sample_radius(1.0, 2.5)
    with pytest.raises(ValueError, match=r"eps_linf must be >= 0, got -0.1"):
        linf_to_l2(-0.1, (3, 32, 32))
    with pytest.raises(ValueError, match=r"shape must be a non-empty sequence of positive"):
        linf_to_l2(0.1, (3, 0, 32))
    with pytest.raises(ValueError, match=r"radii and correct .* got lengths 3 and 2"):
        certified_accuracy([0.1, 0.2, 0.3], [True, False], [0.0])


def test_plot_argument_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"curves must contain at least one label"):
        plot_certified_accuracy({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"curves\['a'\] must have grid and accuracy of equal"):
        plot_certified_accuracy({"a": ([0.0, 1.0], [1.0])}, tmp_path / "x.png")

"""Randomized-smoothing certificates against clean-label poisoning.

Follows Cohen et al. (2019), PREDICT and CERTIFY, as Hong, Carlini and Kurakin adapt them
(Pseudocode 2): the "samples" are m models, each trained on a differently noised (then denoised)
copy of the training set, and each model's prediction on a test point is one vote. The vote
counts per class are the inputs here; training the models is done elsewhere.

Two certificates:

- :func:`certify` (Hong et al.'s setting, test-time noise X = 0): radius sigma * Phi^-1(pA) on the
  l2 norm of the whole training set's perturbation, sqrt(sum_i ||delta_i||_2^2).
- :func:`certify_rab` (RAB, Weber et al.): each model also classifies the test input with its own
  Gaussian noise, and the radius sigma / 2 * (Phi^-1(pA) - Phi^-1(pB)) bounds the l2 norm of the
  joint perturbation of the test input and the training set, sqrt(||delta_x||_2^2 + sum_i ||delta_i||_2^2).

Symbols follow the papers: ``n0`` votes select the class, ``n`` fresh votes estimate its
probability, ``alpha`` is the failure probability, ``pA`` the lower confidence bound on the top
class probability and ``sigma`` the smoothing noise level.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from scipy.stats import beta, binomtest, norm

from lightning_defense.core.store import atomic_write

__all__ = [
    "ABSTAIN",
    "Certificate",
    "CertificateBatch",
    "RabCertificate",
    "RabCertificateBatch",
    "certified_accuracy",
    "certify",
    "certify_batch",
    "certify_rab",
    "certify_rab_batch",
    "linf_to_l2",
    "lower_confidence_bound",
    "per_sample_radius",
    "plot_certified_accuracy",
    "predict",
    "two_class_radius",
    "upper_confidence_bound",
]

ABSTAIN = -1
"""Prediction returned when the smoothed classifier abstains."""


class Certificate(NamedTuple):
    """Result of :func:`certify` for one test point.

    Attributes:
        prediction: Certified class, or ``ABSTAIN`` (-1).
        p_a: Lower confidence bound pA on the top class probability (reported even on abstain).
        radius: Certified l2 radius ``sigma * Phi^-1(pA)``; 0.0 on abstain.
    """

    prediction: int
    p_a: float
    radius: float


class CertificateBatch(NamedTuple):
    """Result of :func:`certify_batch`: one entry per test point, each array shaped (T,)."""

    prediction: np.ndarray
    p_a: np.ndarray
    radius: np.ndarray


class RabCertificate(NamedTuple):
    """Result of :func:`certify_rab` for one test point.

    Attributes:
        prediction: Certified class, or ``ABSTAIN`` (-1).
        p_a: Lower confidence bound pA on the top class probability.
        p_b: Upper confidence bound pB on every other class's probability.
        radius: Certified l2 radius ``sigma / 2 * (Phi^-1(pA) - Phi^-1(pB))`` over the test input and the
            training set jointly; 0.0 on abstain.
    """

    prediction: int
    p_a: float
    p_b: float
    radius: float


class RabCertificateBatch(NamedTuple):
    """Result of :func:`certify_rab_batch`: one entry per test point, each array shaped (T,)."""

    prediction: np.ndarray
    p_a: np.ndarray
    p_b: np.ndarray
    radius: np.ndarray


# --------------------------------------------------------------------------- validation


def _to_numpy(x: Any) -> np.ndarray:
    """Converts a NumPy array, torch tensor (any device) or sequence to a NumPy array."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in the open interval (0, 1), got {alpha!r}")


def _check_sigma(sigma: float) -> None:
    if not sigma > 0.0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")


def _check_counts(counts: Any, name: str, ndim: int) -> np.ndarray:
    """Validates vote counts: ``ndim``-D, at least one class, whole non-negative numbers."""
    arr = _to_numpy(counts)
    shape_name = "(K,)" if ndim == 1 else "(T, K)"
    if arr.ndim != ndim or arr.shape[-1] == 0:
        raise ValueError(
            f"{name} must be a {ndim}-D array of vote counts shaped {shape_name} with K >= 1 "
            f"classes, got shape {arr.shape}"
        )
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must hold numeric vote counts, got dtype {arr.dtype}")
    if np.any(arr < 0):
        raise ValueError(f"{name} must be non-negative vote counts, got {arr.tolist()}")
    if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
        raise ValueError(f"{name} must hold whole-number vote counts, got {arr.tolist()}")
    totals = arr.sum(axis=-1)
    if np.any(totals == 0):
        where = "" if ndim == 1 else f" (rows {np.flatnonzero(totals == 0).tolist()})"
        raise ValueError(f"{name} must hold at least one vote (total n > 0), got n = 0{where}")
    return arr.astype(np.int64)


def _check_same_classes(counts0: np.ndarray, counts: np.ndarray) -> None:
    if counts0.shape != counts.shape:
        raise ValueError(
            "counts0 and counts must have the same shape (same number of classes K), "
            f"got {counts0.shape} and {counts.shape}"
        )


def _scalar_or_array(x: np.ndarray) -> float | np.ndarray:
    return float(x) if np.ndim(x) == 0 else x


# --------------------------------------------------------------------------- statistics


def _clopper_pearson_lower(k: np.ndarray, n: np.ndarray, alpha: float) -> np.ndarray:
    """Vectorised one-sided (1 - alpha) Clopper-Pearson lower bound; 0 where k == 0."""
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    # beta.ppf(alpha, 0, b) is undefined; the exact bound for k == 0 is 0.
    safe_k = np.where(k > 0, k, 1.0)
    return np.where(k > 0, beta.ppf(alpha, safe_k, n - k + 1.0), 0.0)


def _clopper_pearson_upper(k: np.ndarray, n: np.ndarray, alpha: float) -> np.ndarray:
    """Vectorised one-sided (1 - alpha) Clopper-Pearson upper bound; 1 where k == n."""
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    safe_rest = np.where(k < n, n - k, 1.0)  # beta.ppf(1 - alpha, a, 0) is undefined; the bound for k == n is 1
    return np.where(k < n, beta.ppf(1.0 - alpha, k + 1.0, safe_rest), 1.0)


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion.

    LOWERCBOUND in Cohen et al. (2019) and Hong et al. (Pseudocode 2): the lower end of the
    two-sided (1 - 2 * alpha) exact interval, i.e. the alpha quantile of Beta(k, n - k + 1).
    When all n votes agree this is alpha ** (1 / n), the pA of Hong et al. (Sec. 3).

    Args:
        k: Number of votes for the class (0 <= k <= n).
        n: Total number of votes, n >= 1.
        alpha: Failure probability, in (0, 1).

    Returns:
        The lower bound pA; 0.0 when k == 0.

    Raises:
        ValueError: If alpha is not in (0, 1), n < 1, or k is outside [0, n].
    """
    _check_votes(k, n, alpha)
    return float(_clopper_pearson_lower(k, n, alpha))


def _check_votes(k: int, n: int, alpha: float) -> None:
    _check_alpha(alpha)
    if int(n) != n or n < 1:
        raise ValueError(f"n must be an integer >= 1 (number of votes), got {n!r}")
    if int(k) != k or not 0 <= k <= n:
        raise ValueError(f"k must be an integer in [0, n] = [0, {n}], got {k!r}")


def upper_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on a binomial proportion.

    The 1 - alpha quantile of Beta(k + 1, n - k); equals 1 - :func:`lower_confidence_bound` (n - k, n, alpha).

    Args:
        k: Number of votes for the class (0 <= k <= n).
        n: Total number of votes, n >= 1.
        alpha: Failure probability, in (0, 1).

    Returns:
        The upper bound; 1.0 when k == n.

    Raises:
        ValueError: If alpha is not in (0, 1), n < 1, or k is outside [0, n].
    """
    _check_votes(k, n, alpha)
    return float(_clopper_pearson_upper(k, n, alpha))


# --------------------------------------------------------------------------- PREDICT / CERTIFY


def certify(counts0: Any, counts: Any, sigma: float, alpha: float) -> Certificate:
    """CERTIFY of Cohen et al. (2019) as in Hong et al. (Pseudocode 2, lines 8-14).

    The class c_A is the top class of the n0 selection votes ``counts0`` (ties go to the smaller
    class index). pA is the lower confidence bound on its probability from the n = sum(counts)
    estimation votes. If pA < 1/2 the smoothed classifier abstains; otherwise the certified l2
    radius is sigma * Phi^-1(pA) (Corollary 3.4 with pB = 1 - pA), a bound on the total
    perturbation sqrt(sum_i ||delta_i||_2^2) of the training set.

    Args:
        counts0: Selection votes per class, shape (K,), numpy or torch (n0 = sum).
        counts: Estimation votes per class, shape (K,), drawn independently of ``counts0``.
        sigma: Smoothing noise level sigma > 0.
        alpha: Failure probability, in (0, 1).

    Returns:
        ``Certificate(prediction, p_a, radius)``; prediction -1 and radius 0.0 on abstain.

    Raises:
        ValueError: On a bad alpha or sigma, or malformed counts.
    """
    counts0 = _check_counts(counts0, "counts0", ndim=1)
    counts = _check_counts(counts, "counts", ndim=1)
    _check_same_classes(counts0, counts)
    batch = certify_batch(counts0[None], counts[None], sigma, alpha)
    return Certificate(int(batch.prediction[0]), float(batch.p_a[0]), float(batch.radius[0]))


def certify_batch(counts0: Any, counts: Any, sigma: float, alpha: float) -> CertificateBatch:
    """Vectorised :func:`certify` over T test points.

    Args:
        counts0: Selection votes, shape (T, K).
        counts: Estimation votes, shape (T, K).
        sigma: Smoothing noise level sigma > 0.
        alpha: Failure probability, in (0, 1).

    Returns:
        ``CertificateBatch(prediction, p_a, radius)``, arrays of shape (T,).

    Raises:
        ValueError: On a bad alpha or sigma, or malformed counts.
    """
    _check_alpha(alpha)
    _check_sigma(sigma)
    counts0 = _check_counts(counts0, "counts0", ndim=2)
    counts = _check_counts(counts, "counts", ndim=2)
    _check_same_classes(counts0, counts)

    c_hat = np.argmax(counts0, axis=1)  # first maximum: ties go to the smaller index
    n_a = np.take_along_axis(counts, c_hat[:, None], axis=1)[:, 0]
    p_a = _clopper_pearson_lower(n_a, counts.sum(axis=1), alpha)
    certified = p_a >= 0.5
    prediction = np.where(certified, c_hat, ABSTAIN).astype(np.int64)
    radius = np.where(certified, sigma * norm.ppf(np.where(certified, p_a, 0.5)), 0.0)
    return CertificateBatch(prediction, p_a, radius)


def certify_rab(counts0: Any, counts: Any, sigma: float, alpha: float) -> RabCertificate:
    """RAB's certificate (Weber et al., Theorem 1 and its Gaussian corollary) for one test point.

    Each vote comes from a model trained on the training set plus its own Gaussian draw
    D ~ N(0, sigma^2 I) per sample, classifying the test input plus its own draw X ~ N(0, sigma^2 I).
    The class c_A is the top class of ``counts0`` (ties go to the smaller index). From the
    estimation votes ``counts``, pA lower-bounds c_A's probability and pB upper-bounds every other
    class's, as simultaneous Clopper-Pearson bounds: with K classes, K bounds at level alpha / K each
    (Bonferroni; for K = 2 the runner-up's bound is 1 - pA, so one bound at level alpha), and
    pB = min(1 - pA, max_{c != c_A} upper_c). If pA > pB the prediction c_A is certified for every
    joint perturbation of the test input (delta_x) and the training samples (delta_i) with

        sqrt(||delta_x||_2^2 + sum_i ||delta_i||_2^2) < sigma / 2 * (Phi^-1(pA) - Phi^-1(pB));

    otherwise the smoothed classifier abstains. With delta_x = 0 (clean-label poisoning) this is a bound
    on the whole training set's perturbation, as in Hong et al.'s Corollary 3.4.

    Args:
        counts0: Selection votes per class, shape (K,), K >= 2, numpy or torch.
        counts: Estimation votes per class, shape (K,), drawn independently of ``counts0``.
        sigma: Noise level sigma > 0 of both the training-set and the test-input noise.
        alpha: Failure probability of all bounds together, in (0, 1).

    Returns:
        ``RabCertificate(prediction, p_a, p_b, radius)``; prediction -1 and radius 0.0 on abstain.

    Raises:
        ValueError: On a bad alpha or sigma, fewer than 2 classes, or malformed counts.
    """
    counts0 = _check_counts(counts0, "counts0", ndim=1)
    counts = _check_counts(counts, "counts", ndim=1)
    _check_same_classes(counts0, counts)
    batch = certify_rab_batch(counts0[None], counts[None], sigma, alpha)
    return RabCertificate(int(batch.prediction[0]), float(batch.p_a[0]), float(batch.p_b[0]),
                          float(batch.radius[0]))


def certify_rab_batch(counts0: Any, counts: Any, sigma: float, alpha: float) -> RabCertificateBatch:
    """Vectorised :func:`certify_rab` over T test points.

    Args:
        counts0: Selection votes, shape (T, K), K >= 2.
        counts: Estimation votes, shape (T, K).
        sigma: Noise level sigma > 0.
        alpha: Failure probability, in (0, 1).

    Returns:
        ``RabCertificateBatch(prediction, p_a, p_b, radius)``, arrays of shape (T,).

    Raises:
        ValueError: On a bad alpha or sigma, fewer than 2 classes, or malformed counts.
    """
    _check_alpha(alpha)
    _check_sigma(sigma)
    counts0 = _check_counts(counts0, "counts0", ndim=2)
    counts = _check_counts(counts, "counts", ndim=2)
    _check_same_classes(counts0, counts)
    num_classes = counts.shape[1]
    if num_classes < 2:
        raise ValueError(f"RAB's certificate needs K >= 2 classes (pB bounds the runner-up), got K = {num_classes}")

    level = alpha if num_classes == 2 else alpha / num_classes  # Bonferroni over the bounds used
    c_hat = np.argmax(counts0, axis=1)  # first maximum: ties go to the smaller index
    n = counts.sum(axis=1)
    n_a = np.take_along_axis(counts, c_hat[:, None], axis=1)[:, 0]
    p_a = _clopper_pearson_lower(n_a, n, level)
    upper = _clopper_pearson_upper(counts, n[:, None], level)
    np.put_along_axis(upper, c_hat[:, None], -np.inf, axis=1)
    p_b = np.minimum(1.0 - p_a, upper.max(axis=1))
    certified = p_a > p_b
    prediction = np.where(certified, c_hat, ABSTAIN).astype(np.int64)
    gap = norm.ppf(np.where(certified, p_a, 0.5)) - norm.ppf(np.where(certified, p_b, 0.5))
    radius = np.where(certified, sigma / 2.0 * gap, 0.0)
    return RabCertificateBatch(prediction, p_a, p_b, radius)


def predict(counts: Any, alpha: float) -> int:
    """PREDICT of Cohen et al. (2019) as in Hong et al. (Pseudocode 2, lines 1-6).

    Takes the top two classes c_A, c_B with counts nA, nB (ties put the smaller class index
    first) and returns c_A only if the two-sided binomial test of nA out of nA + nB against
    p = 0.5 has p-value <= alpha; otherwise abstains. The wrong-prediction probability is then
    at most alpha.

    Args:
        counts: Votes per class, shape (K,), numpy or torch.
        alpha: Significance level, in (0, 1).

    Returns:
        The predicted class, or -1 (abstain).

    Raises:
        ValueError: On a bad alpha or malformed counts.
    """
    _check_alpha(alpha)
    counts = _check_counts(counts, "counts", ndim=1)
    order = np.argsort(-counts, kind="stable")
    n_a = int(counts[order[0]])
    n_b = int(counts[order[1]]) if counts.size > 1 else 0
    if binomtest(n_a, n_a + n_b, 0.5).pvalue <= alpha:
        return int(order[0])
    return ABSTAIN


# --------------------------------------------------------------------------- radii


def two_class_radius(p_a: float, p_b: float, sigma: float) -> float | np.ndarray:
    """Certified radius sigma / 2 * (Phi^-1(pA) - Phi^-1(pB)).

    Corollary 3.4 of Hong et al. (Weber et al., RAB): the bound on the total training-set
    perturbation sqrt(sum_i ||delta_i||_2^2), given pA lower-bounding the top class probability
    and pB upper-bounding the runner-up (with RAB's test-time noise as well, the bound on the joint
    perturbation of the test input and the training set; see :func:`certify_rab`). A non-positive
    value certifies nothing.

    Args:
        p_a: Lower bound pA, in [0, 1] (scalar or array).
        p_b: Upper bound pB, in [0, 1] (scalar or array).
        sigma: Smoothing noise level sigma > 0.

    Returns:
        The radius (float for scalar inputs).

    Raises:
        ValueError: If sigma <= 0 or a probability is outside [0, 1].
    """
    _check_sigma(sigma)
    p_a, p_b = np.asarray(p_a, dtype=np.float64), np.asarray(p_b, dtype=np.float64)
    for name, p in (("p_a", p_a), ("p_b", p_b)):
        if np.any((p < 0.0) | (p > 1.0)) or np.any(np.isnan(p)):
            raise ValueError(f"{name} must be a probability in [0, 1], got {p.tolist()}")
    return _scalar_or_array(sigma / 2.0 * (norm.ppf(p_a) - norm.ppf(p_b)))


def per_sample_radius(radius: float, r: int) -> float | np.ndarray:
    """Per-sample l2 bound radius / sqrt(r) when r training samples are poisoned.

    Hong et al. (Sec. 3, after Corollary 3.4): if each of r poisoned samples moves by at most
    ||delta||_2, the total is sqrt(r) * ||delta||_2, so ||delta||_2 < radius / sqrt(r). With all
    m models' votes agreeing (pA = alpha ** (1 / m)) this is sigma * Phi^-1(alpha ** (1 / m)) / sqrt(r):
    m, the number of models, sets pA; r, the number of poisoned samples, divides the radius.

    Args:
        radius: Total-perturbation radius from :func:`certify` or :func:`two_class_radius`.
        r: Number of poisoned training samples, an integer >= 1.

    Returns:
        The per-sample radius (float for scalar input).

    Raises:
        ValueError: If r is not an integer >= 1.
    """
    if isinstance(r, bool) or int(r) != r or r < 1:
        raise ValueError(f"r must be an integer >= 1 (number of poisoned samples), got {r!r}")
    return _scalar_or_array(np.asarray(radius, dtype=np.float64) / math.sqrt(r))


def linf_to_l2(eps_linf: float, shape: Sequence[int]) -> float:
    """l2 norm of the worst-case l_inf perturbation, eps * sqrt(prod(shape)).

    Hong et al., Appendix B: an l_inf budget eps that moves every one of the d = prod(shape)
    pixels by eps has l2 norm sqrt(d * eps^2); e.g. 16/255 on 3x32x32 gives about 3.48.

    Args:
        eps_linf: The l_inf budget in the image's scale (e.g. 16 / 255), >= 0.
        shape: Shape of one sample, e.g. (3, 32, 32).

    Returns:
        The equivalent l2 radius.

    Raises:
        ValueError: If eps_linf < 0 or shape is empty or has a non-positive entry.
    """
    if not eps_linf >= 0.0:
        raise ValueError(f"eps_linf must be >= 0, got {eps_linf!r}")
    dims = tuple(shape)
    if len(dims) == 0 or any(int(d) != d or d < 1 for d in dims):
        raise ValueError(f"shape must be a non-empty sequence of positive integers, got {shape!r}")
    return float(eps_linf) * math.sqrt(math.prod(int(d) for d in dims))


# --------------------------------------------------------------------------- evaluation


def certified_accuracy(radii: Any, correct: Any, grid: Any) -> np.ndarray:
    """Certified accuracy at each radius r of ``grid``: mean(correct & (radius >= r)).

    As in Cohen et al. (2019) and Hong et al. (Fig. 1). Abstentions must count as not certified:
    pass ``correct`` False for them (``prediction == label`` already is, since abstain is -1);
    their radius is 0, so a True entry would count them at r = 0.

    Args:
        radii: Certified radius per test point, shape (T,).
        correct: Whether each (non-abstained) prediction equals the label, shape (T,).
        grid: Radii at which to evaluate, shape (G,).

    Returns:
        Certified accuracy per grid radius, shape (G,).

    Raises:
        ValueError: If radii and correct are empty or differ in length.
    """
    radii = _to_numpy(radii).astype(np.float64).reshape(-1)
    correct = _to_numpy(correct).astype(bool).reshape(-1)
    grid = _to_numpy(grid).astype(np.float64).reshape(-1)
    if radii.size == 0 or radii.shape != correct.shape:
        raise ValueError(
            "radii and correct must be non-empty and of equal length, "
            f"got lengths {radii.size} and {correct.size}"
        )
    return (correct[None, :] & (radii[None, :] >= grid[:, None])).mean(axis=1)


def plot_certified_accuracy(
    curves: Mapping[str, tuple[Any, Any]],
    path: str | os.PathLike[str],
    title: str | None = None,
    xlabel: str = "radius (l2)",
    steps: bool = False,
    secondary_xaxis: tuple[str, float] | None = None,
) -> Path:
    """Plots certified accuracy against the certified size, one line per curve (Hong et al., Fig. 1).

    Uses matplotlib's Agg canvas directly, so no display or global backend switch is needed.

    Args:
        curves: Label -> (grid, accuracy), e.g. from :func:`certified_accuracy`.
        path: Output PNG file.
        title: Optional axes title.
        xlabel: The x-axis label, naming the certificate's norm and unit.
        steps: Draw each curve as a step function (constant from each grid point to the next) with integer
            ticks, for integer certificates such as DPA's.
        secondary_xaxis: ``(label, scale)``: a second x-axis on top showing ``scale * x`` (e.g. DPA's
            insertions plus deletions, twice the modified samples of the bottom axis). With ``steps`` its
            ticks fall only on images of integer bottom values, where the curve holds for both units.

    Returns:
        The path written.

    Raises:
        ValueError: If curves is empty or a curve's grid and accuracy differ in length.
    """
    fig = _certified_accuracy_figure(curves, title, xlabel, steps, secondary_xaxis)
    return atomic_write(path, lambda handle: fig.savefig(handle, format="png"))


def _certified_accuracy_figure(curves, title, xlabel, steps, secondary_xaxis):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not curves:
        raise ValueError("curves must contain at least one label -> (grid, accuracy), got {}")
    fig = Figure(figsize=(5.0, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, (grid, accuracy) in curves.items():
        grid = _to_numpy(grid).reshape(-1)
        accuracy = _to_numpy(accuracy).reshape(-1)
        if grid.shape != accuracy.shape:
            raise ValueError(
                f"curves[{label!r}] must have grid and accuracy of equal length, "
                f"got {grid.size} and {accuracy.size}"
            )
        ax.plot(grid, accuracy, label=str(label), drawstyle="steps-post" if steps else "default")
    ax.set_xlabel(xlabel)
    if steps:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if secondary_xaxis is not None:
        top_label, scale = secondary_xaxis
        top = ax.secondary_xaxis("top", functions=(lambda x: x * scale, lambda x: x / scale))
        top.set_xlabel(top_label)
        if steps:  # top ticks only where the bottom ticks are (integers), where both readings are exact
            lo, hi = ax.get_xlim()
            top.set_xticks([scale * t for t in ax.get_xticks() if lo <= t <= hi])
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0.0, 1.0)
    if title is not None:
        ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig

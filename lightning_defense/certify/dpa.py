"""Deep Partition Aggregation (Levine & Feizi, 2021) certificates against general poisoning.

The training set is split into k partitions by a deterministic hash of each sample's pixel
values, one base classifier is trained per partition, and the ensemble predicts the plurality
vote. Inserting or deleting one training sample changes one partition and so at most one vote,
which gives a deterministic certificate on |T (-) U|, the size of the symmetric difference of the
clean and the poisoned training set, i.e. on insertions plus deletions (Theorem 1).

A clean-label poison modifies a training sample: one deletion plus one insertion (the two may even
fall in different partitions). A certified size rho therefore covers floor(rho / 2) modified samples
(:func:`certified_modified_samples`), not rho.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "certified_modified_samples",
    "dpa_certificate",
    "dpa_certificate_batch",
    "dpa_partition",
    "median_certified_size",
]


def dpa_partition(images: Any, k: int) -> torch.Tensor:
    """Partition id of each training sample: h(t) mod k with h = sum of its uint8 pixels.

    Levine & Feizi use a hash of the sample's value only, so the id depends neither on the
    other samples nor on their order; summing the 0..255 pixel values is the hash of their
    public code.

    Args:
        images: Samples shaped (N, C, H, W) (any (N, ...) works): floats in [0, 1], converted
            with round(x * 255), or uint8 already in 0..255. Torch tensor or numpy array.
        k: Number of partitions, an integer >= 1.

    Returns:
        LongTensor of shape (N,) with values in [0, k).

    Raises:
        ValueError: If k < 1, images has fewer than 2 dimensions, a dtype other than floating
            or uint8, or floating values outside [0, 1].
    """
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1 (number of partitions), got {k!r}")
    images = torch.as_tensor(images)
    if images.ndim < 2:
        raise ValueError(
            "images must be shaped (N, C, H, W) or at least (N, ...), "
            f"got shape {tuple(images.shape)}"
        )
    if images.is_floating_point():
        if images.numel() and (images.min() < 0.0 or images.max() > 1.0):
            raise ValueError(
                "floating images must lie in [0, 1], got values in "
                f"[{images.min().item()}, {images.max().item()}]"
            )
        pixels = torch.round(images.double() * 255.0).long()
    elif images.dtype == torch.uint8:
        pixels = images.long()
    else:
        raise ValueError(f"images must be floating in [0, 1] or uint8, got dtype {images.dtype}")
    return pixels.flatten(start_dim=1).sum(dim=1).remainder(int(k))


def _check_votes(votes: Any, num_classes: int, ndim: int) -> torch.Tensor:
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    votes = torch.as_tensor(votes)
    shape_name = "(k,)" if ndim == 1 else "(T, k)"
    if votes.ndim != ndim or votes.shape[-1] == 0:
        raise ValueError(
            f"votes must be a {ndim}-D integer array shaped {shape_name} with k >= 1 partition "
            f"votes, got shape {tuple(votes.shape)}"
        )
    if votes.is_floating_point() or votes.is_complex() or votes.dtype == torch.bool:
        raise ValueError(f"votes must hold integer class indices, got dtype {votes.dtype}")
    if votes.numel() and (votes.min() < 0 or votes.max() >= num_classes):
        raise ValueError(
            f"votes must be class indices in [0, num_classes) = [0, {num_classes}), got values "
            f"in [{votes.min().item()}, {votes.max().item()}]"
        )
    return votes.long()


def dpa_certificate_batch(votes: Any, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised DPA prediction and certificate (Levine & Feizi, Theorem 1) for T test points.

    With n_c the number of partition models voting c, the prediction is c = argmax_c n_c
    (ties go to the smaller class index) and the certified poisoning size is
    rho = floor((n_c - max_{c' != c}(n_{c'} + 1[c' < c])) / 2): the prediction cannot change
    for any poisoned training set U with |T (-) U| <= rho, i.e. at most rho insertions plus deletions
    (a modified sample counts twice; see :func:`certified_modified_samples`).

    Args:
        votes: Each partition model's argmax prediction, integer shape (T, k).
        num_classes: Number of classes, >= 2.

    Returns:
        ``(prediction, certified_size)``, LongTensors of shape (T,); certified_size >= 0, in
        insertions plus deletions.

    Raises:
        ValueError: If votes is not 2-D integer with values in [0, num_classes), or
            num_classes < 2.
    """
    votes = _check_votes(votes, num_classes, ndim=2)
    num_classes = int(num_classes)
    counts = torch.zeros(votes.shape[0], num_classes, dtype=torch.long, device=votes.device)
    counts.scatter_add_(1, votes, torch.ones_like(votes))
    # torch.argmax returns the first maximal index, i.e. ties go to the smaller class.
    prediction = counts.argmax(dim=1)
    classes = torch.arange(num_classes, device=votes.device)
    rival = counts + (classes[None, :] < prediction[:, None]).long()
    rival.scatter_(1, prediction[:, None], -1)  # exclude c' == c (all counts are >= 0)
    n_c = counts.gather(1, prediction[:, None])[:, 0]
    size = torch.div(n_c - rival.max(dim=1).values, 2, rounding_mode="floor")
    return prediction, size


def dpa_certificate(votes: Any, num_classes: int) -> tuple[int, int]:
    """DPA prediction and certified poisoning size for one test point.

    See :func:`dpa_certificate_batch` for the rule (Levine & Feizi, Theorem 1).

    Args:
        votes: Each partition model's argmax prediction, integer shape (k,).
        num_classes: Number of classes, >= 2.

    Returns:
        ``(prediction, certified_size)`` as Python ints.

    Raises:
        ValueError: If votes is not 1-D integer with values in [0, num_classes), or
            num_classes < 2.
    """
    votes = _check_votes(votes, num_classes, ndim=1)
    prediction, size = dpa_certificate_batch(votes[None], num_classes)
    return int(prediction[0]), int(size[0])


def certified_modified_samples(certified_size: Any) -> torch.Tensor:
    """How many modified training samples a DPA certificate covers: floor(rho / 2).

    Theorem 1 of Levine & Feizi counts |T (-) U|, insertions plus deletions; modifying a sample (a
    clean-label poison) deletes the original and inserts the poison, so it costs 2.

    Args:
        certified_size: Certified sizes rho >= 0 in insertions plus deletions, any shape (or an int).

    Returns:
        LongTensor of the same shape.

    Raises:
        ValueError: If a size is negative or not an integer.
    """
    sizes = torch.as_tensor(certified_size)
    if sizes.is_floating_point() or sizes.is_complex() or sizes.dtype == torch.bool:
        raise ValueError(f"certified_size must hold integer sizes (insertions plus deletions), got dtype {sizes.dtype}")
    if sizes.numel() and sizes.min() < 0:
        raise ValueError(f"certified_size must be >= 0, got values down to {sizes.min().item()}")
    return torch.div(sizes.long(), 2, rounding_mode="floor")


def median_certified_size(sizes: Any, correct: Any) -> int:
    """Median certified poisoning size, the DPA paper's "median certified robustness".

    In whatever unit ``sizes`` are: insertions plus deletions (Levine & Feizi), or modified samples
    (pass :func:`certified_modified_samples` of them).

    Misclassified test points count as -1 (not certified at any size, not even 0), as in
    Levine & Feizi. For an even number of points the upper middle value is taken, so the result
    is the largest size s at which certified accuracy, mean(correct & (size >= s)), is still at
    least 50%; it is -1 when fewer than half the points are correct.

    Args:
        sizes: Certified size per test point, shape (T,).
        correct: Whether each prediction equals the label, shape (T,).

    Returns:
        The median certified size.

    Raises:
        ValueError: If sizes and correct are empty or differ in length.
    """
    sizes = torch.as_tensor(sizes).reshape(-1).long()
    correct = torch.as_tensor(correct).reshape(-1).bool().to(sizes.device)
    if sizes.numel() == 0 or sizes.shape != correct.shape:
        raise ValueError(
            "sizes and correct must be non-empty and of equal length, "
            f"got lengths {sizes.numel()} and {correct.numel()}"
        )
    marked = torch.where(correct, sizes, torch.full_like(sizes, -1))
    return int(marked.sort().values[marked.numel() // 2])

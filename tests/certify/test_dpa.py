"""Tests for Deep Partition Aggregation, against hand computations and brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lightning_defense.certify import (
    certified_modified_samples,
    dpa_certificate,
    dpa_certificate_batch,
    dpa_partition,
    median_certified_size,
)

# --------------------------------------------------------------------------- partition


def test_partition_is_pixel_sum_mod_k() -> None:
    image = torch.tensor([0.0, 1.0, 2 / 255, 0.2]).reshape(1, 1, 2, 2)  # 0 + 255 + 2 + 51
    assert dpa_partition(image, 10).tolist() == [308 % 10]
    assert dpa_partition(image, 7).tolist() == [0]  # 308 = 7 * 44


def test_partition_float_and_uint8_agree_and_ignore_order() -> None:
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (20, 3, 4, 4), generator=gen, dtype=torch.uint8)
    ids = dpa_partition(pixels, 5)
    expected = [int(p.to(torch.int64).sum()) % 5 for p in pixels]
    assert ids.dtype == torch.long
    assert ids.tolist() == expected
    assert torch.equal(dpa_partition(pixels.float() / 255.0, 5), ids)
    assert torch.equal(dpa_partition(pixels.numpy(), 5), ids)
    perm = torch.randperm(20, generator=gen)
    assert torch.equal(dpa_partition(pixels[perm], 5), ids[perm])
    assert torch.equal(dpa_partition(pixels[:7], 5), ids[:7])  # independent of other samples


# --------------------------------------------------------------------------- certificate


@pytest.mark.parametrize(
    ("votes", "num_classes", "expected"),
    [
        ([0, 0, 1, 1], 2, (0, 0)),  # tie -> class 0, gap 2 - 2 = 0
        ([1, 1, 1, 0], 2, (1, 0)),  # 3 - (1 + 1[0 < 1]) = 1 -> 0
        ([1, 1, 1, 1, 0], 2, (1, 1)),  # 4 - 2 = 2 -> 1
        ([0, 0, 0, 0, 1, 1], 3, (0, 1)),  # 4 - (2 + 0) = 2 -> 1
        ([1, 1, 2, 2, 2, 2], 3, (2, 0)),  # 4 - (2 + 1) = 1 -> 0: the 1[c' < c] term bites
        ([2, 2, 2, 1, 1, 1], 3, (1, 0)),  # tie 1 vs 2 -> 1
        ([2, 2, 2, 2, 2, 0, 1], 3, (2, 1)),  # 5 - (1 + 1) = 3 -> 1
        ([3, 3, 3, 3, 3, 3, 3], 5, (3, 3)),  # 7 - (0 + 1) = 6 -> 3
    ],
)
def test_certificate_hand_examples(
    votes: list[int], num_classes: int, expected: tuple[int, int]
) -> None:
    assert dpa_certificate(torch.tensor(votes), num_classes) == expected
    assert dpa_certificate(np.array(votes), num_classes) == expected


def _plurality(votes: np.ndarray, num_classes: int) -> np.ndarray:
    counts = (votes[..., None] == np.arange(num_classes)).sum(axis=-2)
    return counts.argmax(axis=-1)


def test_certificate_is_exact_vote_flip_distance() -> None:
    # Brute force over every vote vector of k = 5 models and 3 classes: the certificate must be
    # one less than the fewest votes that must change to change the plurality prediction.
    k, num_classes = 5, 3
    all_votes = np.array(list(itertools.product(range(num_classes), repeat=k)))
    preds = _plurality(all_votes, num_classes)
    hamming = (all_votes[:, None, :] != all_votes[None, :, :]).sum(axis=-1)
    flip_distance = np.where(preds[:, None] != preds[None, :], hamming, k + 1).min(axis=1)

    pred, size = dpa_certificate_batch(torch.from_numpy(all_votes), num_classes)
    np.testing.assert_array_equal(pred.numpy(), preds)
    np.testing.assert_array_equal(size.numpy(), flip_distance - 1)
    assert size.max().item() == 2  # unanimous 5 votes: floor((5 - 1) / 2) for class > 0


def test_modified_samples_are_half_the_insertions_and_deletions() -> None:
    # A modified sample (clean-label poison) deletes one sample and inserts another: up to 2 partitions, so up
    # to 2 votes change. r modifications are certified iff 2r votes changing cannot flip the plurality, i.e.
    # 2r < flip distance; the largest such r must be certified_modified_samples(size), not size.
    k, num_classes = 7, 3
    all_votes = np.array(list(itertools.product(range(num_classes), repeat=k)))
    preds = _plurality(all_votes, num_classes)
    hamming = (all_votes[:, None, :] != all_votes[None, :, :]).sum(axis=-1)
    flip_distance = np.where(preds[:, None] != preds[None, :], hamming, k + 1).min(axis=1)
    _, size = dpa_certificate_batch(torch.from_numpy(all_votes), num_classes)
    largest_r = np.array([max(r for r in range(k + 1) if 2 * r < d) for d in flip_distance])
    np.testing.assert_array_equal(certified_modified_samples(size).numpy(), largest_r)
    assert (size.numpy() != largest_r).any()  # the two units differ
    assert certified_modified_samples(5).item() == 2 and certified_modified_samples(np.array([0, 1])).tolist() == [0, 0]
    with pytest.raises(ValueError, match="certified_size must be >= 0"):
        certified_modified_samples(torch.tensor([2, -1]))
    with pytest.raises(ValueError, match="certified_size must hold integer sizes"):
        certified_modified_samples(torch.tensor([1.5]))


def test_certificate_batch_matches_single() -> None:
    gen = torch.Generator().manual_seed(1)
    votes = torch.randint(0, 4, (50, 9), generator=gen)
    pred, size = dpa_certificate_batch(votes, 4)
    assert pred.shape == size.shape == (50,)
    assert pred.dtype == size.dtype == torch.long
    single = [dpa_certificate(v, 4) for v in votes]
    assert list(zip(pred.tolist(), size.tolist())) == single


# --------------------------------------------------------------------------- median


def test_median_certified_size_counts_misclassified_as_minus_one() -> None:
    # Marked sizes [5, 3, 0, -1]; at size 3 certified accuracy is still 2/4 = 50%.
    assert median_certified_size([5, 3, 0, 2], [True, True, True, False]) == 3
    assert median_certified_size(torch.tensor([4, 1, 7]), torch.tensor([True, False, True])) == 4
    assert median_certified_size([4, 1, 7], [False, False, True]) == -1


def test_median_is_largest_size_with_half_certified() -> None:
    rng = np.random.default_rng(2)
    for trial in range(20):
        t = 5 + trial
        sizes = rng.integers(0, 10, size=t)
        correct = rng.random(t) < 0.7
        best = max(
            (s for s in range(-1, 11) if np.mean(np.where(correct, sizes, -1) >= s) >= 0.5),
        )
        assert median_certified_size(sizes, correct) == best


# --------------------------------------------------------------------------- errors


def test_partition_errors() -> None:
    images = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match=r"k must be an integer >= 1 .* got 0"):
        dpa_partition(images, 0)
    with pytest.raises(ValueError, match=r"floating images must lie in \[0, 1\], got values in"):
        dpa_partition(images + 2.0, 3)
    with pytest.raises(ValueError, match=r"images must be floating in \[0, 1\] or uint8, got"):
        dpa_partition(images.int(), 3)
    with pytest.raises(ValueError, match=r"images must be shaped \(N, C, H, W\).*shape \(4,\)"):
        dpa_partition(torch.zeros(4), 3)


def test_certificate_errors() -> None:
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 2, got 1"):
        dpa_certificate([0, 0], 1)
    with pytest.raises(ValueError, match=r"votes must be class indices in \[0, num_classes\)"):
        dpa_certificate([0, 3], 3)
    with pytest.raises(ValueError, match=r"votes must be class indices"):
        dpa_certificate_batch([[0, -1]], 3)
    with pytest.raises(ValueError, match=r"votes must hold integer class indices, got dtype"):
        dpa_certificate([0.0, 1.0], 3)
    with pytest.raises(ValueError, match=r"votes must be a 1-D integer array .*shape \(1, 2\)"):
        dpa_certificate([[0, 1]], 3)
    with pytest.raises(ValueError, match=r"votes must be a 2-D integer array .* got shape \(2,\)"):
        dpa_certificate_batch([0, 1], 3)
    with pytest.raises(ValueError, match=r"votes must be a 1-D .* got shape \(0,\)"):
        dpa_certificate(torch.zeros(0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"sizes and correct .* got lengths 2 and 3"):
        median_certified_size([1, 2], [True, True, False])

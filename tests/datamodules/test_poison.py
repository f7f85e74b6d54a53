import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_defense.datamodules.poison import PoisonSet, PoisonSetError

N, C, H, W = 50, 3, 8, 8
D = C * H * W
EPS = 8 / 255


@pytest.fixture
def base():
    gen = torch.Generator().manual_seed(0)
    # Keep pixels away from 0 and 1 so that perturbations of a few eps never need clamping.
    images = 0.2 + 0.6 * torch.rand(N, C, H, W, generator=gen)
    labels = torch.randint(0, 10, (N,), generator=gen)
    return images, labels


def linf_poisons(base_images, indices, size, seed=1):
    """Poisons whose every pixel moves by exactly +-size."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (len(indices), C, H, W), generator=gen).float() * 2 - 1
    return base_images[indices] + size * signs


def l2_poisons(base_images, indices, size, seed=1):
    """Poisons whose perturbation has L2 norm exactly size."""
    gen = torch.Generator().manual_seed(seed)
    delta = torch.randn(len(indices), C, H, W, generator=gen, dtype=torch.float64)
    delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * size
    return (base_images[indices].double() + delta).float()


def make(base, indices=(3, 7, 20), norm="linf", eps=EPS, size=None, **kwargs):
    images, labels = base
    idx = torch.tensor(indices, dtype=torch.int64)
    perturb = linf_poisons if norm == "linf" else l2_poisons
    poisons = perturb(images, idx, eps if size is None else size)
    return PoisonSet(idx, poisons, labels[idx].clone(), norm, eps, **kwargs)


def full_poison_set(base):
    images, labels = base
    gen = torch.Generator().manual_seed(5)
    return make(
        base,
        kind="backdoor",
        target_images=torch.rand(2, C, H, W, generator=gen),
        target_labels=torch.tensor([1, 2]),
        adversarial_labels=torch.tensor([4, 4]),
        trigger=torch.rand(C, 5, 5, generator=gen),
        source_class=1,
        target_class=4,
        metadata={"attack": "unit-test", "seed": "0"},
    )


def assert_same(a: PoisonSet, b: PoisonSet):
    for name in ("indices", "images", "labels", "target_images", "target_labels", "adversarial_labels", "trigger"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None:
            assert y is None, name
        else:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    for name in ("norm", "eps", "kind", "source_class", "target_class", "metadata"):
        assert getattr(a, name) == getattr(b, name), name


# ---------------------------------------------------------------- construction


def test_post_init_rejects_inconsistent_fields(base):
    ps = make(base)
    with pytest.raises(PoisonSetError, match="lengths 3, 2 and 3"):
        PoisonSet(ps.indices, ps.images[:2], ps.labels, "linf", EPS)
    with pytest.raises(PoisonSetError, match="labels must be int64"):
        PoisonSet(ps.indices, ps.images, ps.labels.int(), "linf", EPS)
    with pytest.raises(PoisonSetError, match="images must be floating point"):
        PoisonSet(ps.indices, (ps.images * 255).to(torch.uint8), ps.labels, "linf", EPS)
    with pytest.raises(PoisonSetError, match="norm must be one of"):
        PoisonSet(ps.indices, ps.images, ps.labels, "l1", EPS)
    with pytest.raises(PoisonSetError, match="kind must be one of"):
        PoisonSet(ps.indices, ps.images, ps.labels, "linf", EPS, kind="random")
    with pytest.raises(PoisonSetError, match="eps must be a finite number > 0"):
        PoisonSet(ps.indices, ps.images, ps.labels, "linf", 0.0)
    with pytest.raises(PoisonSetError, match="adversarial_labels has 1 entries but there are 2"):
        PoisonSet(
            ps.indices, ps.images, ps.labels, "linf", EPS,
            target_images=torch.rand(2, C, H, W), adversarial_labels=torch.tensor([1]),
        )
    with pytest.raises(PoisonSetError, match="target_labels is given without target_images"):
        PoisonSet(ps.indices, ps.images, ps.labels, "linf", EPS, target_labels=torch.tensor([1]))
    with pytest.raises(PoisonSetError, match="metadata must be a dict of str to str"):
        PoisonSet(ps.indices, ps.images, ps.labels, "linf", EPS, metadata={"seed": 0})


# ---------------------------------------------------------------- validation


def test_valid_poison_set_passes(base):
    make(base).validate(*base)


def test_index_out_of_range(base):
    ps = make(base, indices=(3, 7, 20))
    ps.indices[2] = N
    with pytest.raises(PoisonSetError, match=r"indices: index 50 is out of range \[0, 50\).*N=50"):
        ps.validate(*base)
    ps.indices[2] = -1
    with pytest.raises(PoisonSetError, match=r"index -1 is out of range"):
        ps.validate(*base)


def test_duplicate_indices(base):
    images, labels = base
    idx = torch.tensor([3, 7, 3, 9, 9])
    ps = PoisonSet(idx, images[idx].clone(), labels[idx].clone(), "linf", EPS)
    with pytest.raises(PoisonSetError, match=r"indices: duplicate indices \[3, 9\]"):
        ps.validate(*base)


def test_shape_mismatch(base):
    images, labels = base
    idx = torch.tensor([1, 2])
    ps = PoisonSet(idx, torch.rand(2, C, H + 1, W), labels[idx].clone(), "linf", EPS)
    with pytest.raises(PoisonSetError, match=r"per-sample shape \(3, 9, 8\) differs from .* \(3, 8, 8\)"):
        ps.validate(*base)


def test_pixels_outside_unit_range(base):
    ps = make(base)
    ps.images[0, 0, 0, 0] = 1.25
    ps.images[1, 0, 0, 0] = -0.5
    with pytest.raises(PoisonSetError, match=r"images: pixels must lie in \[0, 1\], got min -0.5 and max 1.25"):
        ps.validate(*base)


def test_label_flip_is_refused(base):
    ps = make(base, indices=(3, 7, 20))
    ps.labels[1] = (ps.labels[1] + 1) % 10
    with pytest.raises(PoisonSetError, match=r"clean-label violated .* poison 1 \(base index 7\)"):
        ps.validate(*base)


def test_base_labels_length_mismatch(base):
    images, labels = base
    with pytest.raises(PoisonSetError, match="base_labels has 49 entries"):
        make(base).validate(images, labels[:-1])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_perturbation_exactly_at_eps_passes(base, norm):
    eps = 8 / 255 if norm == "linf" else 0.5
    ps = make(base, norm=norm, eps=eps)
    linf, l2 = ps.perturbation_norms(base[0])
    assert (linf if norm == "linf" else l2) == pytest.approx(torch.full((3,), eps, dtype=torch.float64), abs=1e-6)
    ps.validate(*base, rounding_tolerance=0.0)
    ps.validate(*base)


def test_linf_perturbation_above_tolerance_fails(base):
    ps = make(base, indices=(3, 7, 20), size=EPS)
    ps.images[1] = linf_poisons(base[0], torch.tensor([7]), EPS + 2 / 255)[0]
    pattern = r"exceeds eps=0.0313725 in linf.*poison 1 \(base index 7\) with linf norm 0.0392"
    with pytest.raises(PoisonSetError, match=pattern):
        ps.validate(*base)


def test_l2_perturbation_above_tolerance_fails(base):
    eps = 0.5
    ps = make(base, indices=(3, 7, 20), norm="l2", eps=eps)
    # Without rounding slack, 2/255 above eps already fails.
    ps.images[2] = l2_poisons(base[0], torch.tensor([20]), eps + 2 / 255)[0]
    with pytest.raises(PoisonSetError, match=r"in l2 .*poison 2 \(base index 20\) with l2 norm 0.5078"):
        ps.validate(*base, rounding_tolerance=0.0)
    # With the default 8-bit slack (1/255 per pixel, i.e. sqrt(d)/255 in L2), 2/255 per pixel fails.
    ps.images[2] = l2_poisons(base[0], torch.tensor([20]), eps + 2 / 255 * math.sqrt(D))[0]
    with pytest.raises(PoisonSetError, match=r"in l2 .*poison 2 \(base index 20\)"):
        ps.validate(*base)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_poison_rounded_to_8_bit_passes(base, norm):
    eps = 8 / 255 if norm == "linf" else 0.5
    ps = make(base, norm=norm, eps=eps)
    ps.images = torch.round(ps.images * 255) / 255
    linf, l2 = ps.perturbation_norms(base[0])
    assert ((linf if norm == "linf" else l2) > eps).any()  # rounding did push some beyond eps
    ps.validate(*base)


# ---------------------------------------------------------------- apply


def test_apply_replaces_only_the_poisoned_rows(base):
    images, _ = base
    ps = make(base, indices=(3, 7, 20))
    poisoned = ps.apply(images)
    assert poisoned is not images and poisoned.shape == images.shape
    assert torch.equal(poisoned[ps.indices], ps.images)
    others = torch.ones(N, dtype=torch.bool)
    others[ps.indices] = False
    assert torch.equal(poisoned[others], images[others])
    assert not torch.equal(images[3], ps.images[0])  # the base was not modified in place


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_round_trip_with_all_fields(base, tmp_path, suffix):
    ps = full_poison_set(base)
    path = tmp_path / f"poisons{suffix}"
    ps.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left behind
    loaded = PoisonSet.load(path, *base)
    assert_same(ps, loaded)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_round_trip_minimal(base, tmp_path, suffix):
    ps = make(base, norm="l2", eps=0.5, kind="indiscriminate")
    ps.save(tmp_path / f"p{suffix}")
    assert_same(ps, PoisonSet.load(tmp_path / f"p{suffix}", validate=False))


def test_unknown_suffix(base, tmp_path):
    with pytest.raises(PoisonSetError, match=r"unsupported suffix '\.pt'; use one of \.safetensors, \.npz"):
        make(base).save(tmp_path / "poisons.pt")
    with pytest.raises(PoisonSetError, match="unsupported suffix"):
        PoisonSet.load(tmp_path / "poisons.pkl")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here.npz"):
        PoisonSet.load(tmp_path / "nothing_here.npz")


def test_load_validates_against_base(base, tmp_path):
    images, labels = base
    make(base).save(tmp_path / "p.npz")
    flipped = labels.clone()
    flipped[7] += 1
    with pytest.raises(PoisonSetError, match=r"p\.npz: labels: clean-label violated"):
        PoisonSet.load(tmp_path / "p.npz", images, flipped)


def test_load_without_the_base_needs_an_explicit_validate_false(base, tmp_path):
    """The eps budget can only be measured against the clean images: loading without them must be a choice."""
    images, labels = base
    make(base, eps=EPS, size=0.1).save(tmp_path / "p.npz")  # declares 8/255, perturbs by 0.1
    with pytest.raises(PoisonSetError, match=r"p\.npz: its eps budget .* pass base_images and base_labels, or "
                                             r"validate=False"):
        PoisonSet.load(tmp_path / "p.npz")
    assert len(PoisonSet.load(tmp_path / "p.npz", validate=False)) == 3  # read, budget unchecked
    with pytest.raises(PoisonSetError, match=r"p\.npz: images: perturbation exceeds eps=0.0313725"):
        PoisonSet.load(tmp_path / "p.npz", images, labels, validate=False)  # with the base, always validated


@pytest.mark.parametrize("field, value, match", [
    ("images", 1.5, r"images: pixels must lie in \[0, 1\], got min .* and max 1.5"),
    ("images", float("nan"), r"images: row 1 holds NaN or infinite pixels"),
    ("target_images", -0.25, r"target_images: pixels must lie in \[0, 1\], got min -0.25"),
    ("labels", -1, r"labels: class index -1 is negative"),
    ("adversarial_labels", -3, r"adversarial_labels: class index -3 is negative"),
    ("indices", -2, r"indices: index -2 is negative"),
    ("indices", 7, r"indices: duplicate indices \[7\]"),
    ("target_class", -1, r"target_class is -1"),
])
@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_load_without_the_base_checks_what_needs_no_base(base, tmp_path, suffix, field, value, match):
    ps = full_poison_set(base)
    if field in ("images", "target_images"):
        getattr(ps, field)[1, 0, 0, 0] = value
    elif field == "target_class":
        ps.target_class = value
    else:
        getattr(ps, field)[0] = value
    path = tmp_path / f"p{suffix}"
    ps.save(path)
    with pytest.raises(PoisonSetError, match=rf"p{re.escape(suffix)}: {match}"):
        PoisonSet.load(path, validate=False)
    with pytest.raises(PoisonSetError):
        ps.check()


def test_nan_pixels_fail_validation(base):
    """NaN compares False to every bound, so a range check alone would let it through."""
    ps = make(base)
    ps.images[2, 1, 3, 3] = float("nan")
    with pytest.raises(PoisonSetError, match=r"images: row 2 holds NaN or infinite pixels"):
        ps.validate(*base)


def test_check_bound_against_a_users_eps(base):
    ps = make(base, eps=8 / 255)
    ps.check_bound(8 / 255, "linf")
    ps.check_bound(0.0313725, "linf")  # 8/255 written with 7 digits
    ps.check_bound(16 / 255, "linf")
    with pytest.raises(PoisonSetError, match=r"declares linf eps=0.03137255 \(8/255\), above the allowed 0.01568627"):
        ps.check_bound(4 / 255, "linf")
    with pytest.raises(PoisonSetError, match="declares an linf bound but an l2 bound was asked for"):
        ps.check_bound(1.0, "l2")


def test_corrupt_files(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"definitely not safetensors")
    with pytest.raises(PoisonSetError, match=r"bad\.safetensors: cannot read"):
        PoisonSet.load(tmp_path / "bad.safetensors", validate=False)
    (tmp_path / "bad.npz").write_bytes(b"definitely not a zip")
    with pytest.raises(PoisonSetError, match=r"bad\.npz"):
        PoisonSet.load(tmp_path / "bad.npz", validate=False)


def test_missing_key_is_named(base, tmp_path):
    ps = make(base)
    ps.save(tmp_path / "p.npz")
    with np.load(tmp_path / "p.npz") as archive:
        arrays = {k: archive[k] for k in archive.files if k != "labels"}
    np.savez(tmp_path / "nolabels.npz", **arrays)
    with pytest.raises(PoisonSetError, match=r"nolabels\.npz: missing key 'labels'"):
        PoisonSet.load(tmp_path / "nolabels.npz", validate=False)
    np.savez(tmp_path / "noheader.npz", indices=arrays["indices"])
    with pytest.raises(PoisonSetError, match=r"noheader\.npz: missing key 'poison_set'"):
        PoisonSet.load(tmp_path / "noheader.npz", validate=False)


class _Marker:
    """Unpickling this object creates a file: evidence that a pickle was executed."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_npz_with_object_array_is_not_unpickled(base, tmp_path):
    marker = tmp_path / "pwned"
    ps = make(base)
    ps.save(tmp_path / "p.npz")
    with np.load(tmp_path / "p.npz") as archive:
        arrays = {k: archive[k] for k in archive.files}
    arrays["images"] = np.array([_Marker(marker)], dtype=object)
    np.savez(tmp_path / "evil.npz", **arrays)  # numpy pickles object arrays when saving
    assert not marker.exists()
    with pytest.raises(PoisonSetError, match="pickled Python objects, which are never loaded"):
        PoisonSet.load(tmp_path / "evil.npz", validate=False)
    assert not marker.exists()
    # Sanity check of the payload itself: unpickling does create the marker.
    pickle.loads(pickle.dumps(_Marker(marker)))
    assert marker.exists()

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_defense.datamodules.importers import (
    UntrustedPickleError,
    from_benchmark_pickles,
    from_npy,
    from_poisoned_arrays,
)
from lightning_defense.datamodules.poison import PoisonSetError

N, C, H, W = 50, 3, 8, 8
EPS = 8 / 255
PLANTED = [4, 11, 12, 37]


@pytest.fixture
def base():
    """A clean split stored as 8-bit values, as CIFAR-10 is."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(20, 236, (N, C, H, W), generator=gen).float() / 255
    labels = torch.randint(0, 10, (N,), generator=gen)
    return images, labels


def poisoned_copy(images, indices=PLANTED, seed=1):
    """The whole training set with +-8/255 noise (8-bit exact) on the planted rows."""
    gen = torch.Generator().manual_seed(seed)
    poisoned = images.clone()
    steps = torch.randint(-8, 9, (len(indices), C, H, W), generator=gen)
    steps[:, 0, 0, 0] = 8  # every poison changes at least one pixel
    poisoned[indices] = (torch.round(images[indices] * 255) + steps) / 255
    return poisoned


def to_uint8_nhwc(images):
    return torch.round(images * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------- ART arrays


def test_art_nhwc_uint8_with_one_hot_labels(base):
    images, labels = base
    x = to_uint8_nhwc(poisoned_copy(images))
    y = np.eye(10, dtype=np.float32)[labels.numpy()]  # ART usually passes one-hot labels
    ps = from_poisoned_arrays(x, y, images, labels, eps=EPS, metadata={"attack": "art"})
    assert ps.indices.tolist() == PLANTED
    assert torch.equal(ps.labels, labels[PLANTED])
    assert torch.allclose(ps.images, poisoned_copy(images)[PLANTED])
    assert ps.metadata == {"attack": "art"} and ps.kind == "targeted" and ps.norm == "linf"


def test_art_nchw_float_against_unquantised_base(base):
    images, labels = base
    # A float base that is not on the 8-bit grid: re-quantised clean rows must not count as poisons.
    fine = images + (torch.rand(images.shape, generator=torch.Generator().manual_seed(3)) - 0.5) / 255
    x = poisoned_copy(fine).numpy()
    x_rounded = np.round(x * 255) / 255  # clean rows move by up to half a step
    ps = from_poisoned_arrays(x_rounded.astype(np.float32), labels.numpy(), fine, labels, eps=EPS)
    assert ps.indices.tolist() == PLANTED


def test_art_length_mismatch(base):
    images, labels = base
    x = to_uint8_nhwc(poisoned_copy(images))[:-1]
    with pytest.raises(PoisonSetError, match="poisoned_x has 49 rows and poisoned_y 50, but the base split has 50"):
        from_poisoned_arrays(x, labels.numpy(), images, labels, eps=EPS)


def test_art_layout_mismatch(base):
    images, labels = base
    with pytest.raises(PoisonSetError, match=r"matches neither the base layout \(3, 8, 8\)"):
        from_poisoned_arrays(np.zeros((N, 4, 8, 8), np.uint8), labels.numpy(), images, labels, eps=EPS)


def test_art_label_flip_is_refused(base):
    images, labels = base
    y = labels.clone()
    y[12] = (y[12] + 1) % 10
    with pytest.raises(PoisonSetError, match=r"labels differ from base_labels at rows \[12\]"):
        from_poisoned_arrays(poisoned_copy(images).numpy(), y.numpy(), images, labels, eps=EPS)


def test_art_budget_is_checked(base):
    images, labels = base
    with pytest.raises(PoisonSetError, match="exceeds eps"):
        from_poisoned_arrays(poisoned_copy(images).numpy(), labels.numpy(), images, labels, eps=4 / 255)


def test_art_clean_set_has_no_poisons(base):
    images, labels = base
    with pytest.raises(PoisonSetError, match="no row differs"):
        from_poisoned_arrays(images.numpy(), labels.numpy(), images, labels, eps=EPS)


# ---------------------------------------------------------------- .npy (Geiping's toolkit)


def test_npy_export_of_geiping_toolkit(base, tmp_path):
    images, labels = base
    # The toolkit's "numpy" export: float64, NHWC, whole numbers 0..255, float64 labels.
    np.save(tmp_path / "poisoned_training_data.npy", to_uint8_nhwc(poisoned_copy(images)).astype(np.float64))
    np.save(tmp_path / "poisoned_training_labels.npy", labels.numpy().astype(np.float64))
    ps = from_npy(
        tmp_path / "poisoned_training_data.npy", images, labels, eps=EPS,
        labels_path=tmp_path / "poisoned_training_labels.npy",
    )
    assert ps.indices.tolist() == PLANTED
    assert torch.allclose(ps.images, poisoned_copy(images)[PLANTED])


def test_npy_without_labels_uses_base_labels(base, tmp_path):
    images, labels = base
    np.save(tmp_path / "x.npy", poisoned_copy(images).numpy())
    ps = from_npy(tmp_path / "x.npy", images, labels, eps=EPS, norm="linf", kind="indiscriminate")
    assert ps.indices.tolist() == PLANTED and ps.kind == "indiscriminate"


def test_npy_missing_file(base, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        from_npy(tmp_path / "missing.npy", *base, eps=EPS)


def test_npy_object_array_is_refused(base, tmp_path):
    np.save(tmp_path / "x.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(PoisonSetError, match="pickled data is never loaded"):
        from_npy(tmp_path / "x.npy", *base, eps=EPS)


# ---------------------------------------------------------------- benchmark pickles


def to_pil(image):
    return Image.fromarray(torch.round(image * 255).to(torch.uint8).permute(1, 2, 0).numpy())


def write_benchmark(directory: Path, images, labels, backdoor=False):
    directory.mkdir()
    poisoned = poisoned_copy(images)
    poisons = [(to_pil(poisoned[i]), int(labels[i])) for i in PLANTED]
    target_image = torch.rand(C, H, W, generator=torch.Generator().manual_seed(9))
    target = (to_pil(target_image), 3)
    if backdoor:
        patch = torch.rand(3, 5, 5, generator=torch.Generator().manual_seed(10))
        target = (*target, patch, [2, 1])
    for name, obj in [("poisons", poisons), ("base_indices", PLANTED), ("target", target)]:
        with open(directory / f"{name}.pickle", "wb") as handle:
            pickle.dump(obj, handle)
    return poisoned, target


class _Marker:
    """Unpickling this object creates a file: evidence that a pickle was executed."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_benchmark_refuses_untrusted_pickles(base, tmp_path):
    directory = tmp_path / "trial"
    write_benchmark(directory, *base)
    marker = tmp_path / "pwned"
    for name in ("poisons", "base_indices", "target"):
        with open(directory / f"{name}.pickle", "wb") as handle:
            pickle.dump(_Marker(marker), handle)
    with pytest.raises(UntrustedPickleError, match="can run arbitrary code.*trust_pickle=True"):
        from_benchmark_pickles(directory, *base, eps=EPS)
    assert not marker.exists()
    assert issubclass(UntrustedPickleError, PermissionError)
    # The payload is real: trusting the directory executes it.
    with pytest.raises(PoisonSetError):
        from_benchmark_pickles(directory, *base, eps=EPS, trust_pickle=True)
    assert marker.exists()


def test_benchmark_missing_file(base, tmp_path):
    directory = tmp_path / "trial"
    write_benchmark(directory, *base)
    (directory / "target.pickle").unlink()
    with pytest.raises(FileNotFoundError, match="has no target.pickle"):
        from_benchmark_pickles(directory, *base, eps=EPS, trust_pickle=True)


def test_benchmark_targeted_import(base, tmp_path):
    images, labels = base
    poisoned, target = write_benchmark(tmp_path / "trial", images, labels)
    ps = from_benchmark_pickles(tmp_path / "trial", images, labels, eps=EPS, trust_pickle=True)
    assert ps.kind == "targeted" and ps.trigger is None
    assert ps.indices.tolist() == PLANTED
    assert torch.allclose(ps.images, poisoned[PLANTED])
    assert torch.equal(ps.labels, labels[PLANTED])
    expected_target = torch.from_numpy(np.array(target[0])).permute(2, 0, 1).float() / 255
    assert torch.allclose(ps.target_images[0], expected_target)
    assert ps.target_labels.tolist() == [3]
    assert ps.adversarial_labels.tolist() == [int(labels[PLANTED[0]])]  # the poisons' label by default
    override = from_benchmark_pickles(
        tmp_path / "trial", images, labels, eps=EPS, trust_pickle=True, adversarial_label=7
    )
    assert override.adversarial_labels.tolist() == [7]


def test_benchmark_backdoor_import(base, tmp_path):
    images, labels = base
    _, target = write_benchmark(tmp_path / "trial", images, labels, backdoor=True)
    ps = from_benchmark_pickles(tmp_path / "trial", images, labels, eps=EPS, trust_pickle=True)
    assert ps.kind == "backdoor"
    assert torch.equal(ps.trigger, target[2])
    assert ps.source_class == 3 and ps.target_class == int(labels[PLANTED[0]])
    assert ps.metadata["trigger_xy"] == "2,1"


def test_benchmark_budget_is_checked(base, tmp_path):
    write_benchmark(tmp_path / "trial", *base)
    with pytest.raises(PoisonSetError, match="exceeds eps"):
        from_benchmark_pickles(tmp_path / "trial", *base, eps=2 / 255, trust_pickle=True)

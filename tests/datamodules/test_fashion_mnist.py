import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_defense.datamodules import FashionMNISTDataModule
from lightning_defense.datamodules.base import seeded_split
from lightning_defense.datamodules.fashion_mnist import DEFAULT_DIR, CorruptIdxError, read_fashion_mnist

HOW_TO_GET = ["apt-get install dataset-fashion-mnist", "torchvision.datasets.FashionMNIST(root, download=True)"]


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8) in the idx format: magic 0x000008<ndim>, big-endian dims, then the bytes."""
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_split_files(folder: Path, gz: bool, n_train=20, n_test=5, seed=0):
    """Tiny synthetic Fashion-MNIST idx files; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        raw = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("torchvision_layout", [False, True], ids=["flat", "torchvision"])
def test_reads_idx_files(tmp_path, gz, torchvision_layout):
    folder = tmp_path / "FashionMNIST" / "raw" if torchvision_layout else tmp_path
    arrays = write_split_files(folder, gz)
    dm = FashionMNISTDataModule(str(tmp_path), val_fraction=0.25, batch_size=5, seed=3)
    dm.prepare_data()
    dm.setup("fit")
    train_x = torch.from_numpy(arrays["train-images-idx3-ubyte"]).unsqueeze(1)
    train_y = torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long()
    val_idx, train_idx = seeded_split(20, (0.25,), seed=3)
    assert torch.equal(dm.val_indices, val_idx) and torch.equal(dm.train_indices, train_idx)
    assert dm.train_set.images.dtype == torch.uint8 and dm.train_set.images.shape == (15, 1, 28, 28)
    assert torch.equal(dm.train_set.images, train_x[train_idx]) and torch.equal(dm.train_set.labels, train_y[train_idx])
    assert torch.equal(dm.val_set.images, train_x[val_idx]) and torch.equal(dm.val_set.labels, train_y[val_idx])
    x, y, idx = next(iter(dm.test_dataloader()))
    assert x.dtype == torch.float32 and x.shape == (5, 1, 28, 28)
    torch.testing.assert_close(x, torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).unsqueeze(1).float() / 255)
    assert y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist() and idx.tolist() == list(range(5))


def test_resize_and_channels(tmp_path):
    arrays = write_split_files(tmp_path, gz=True)
    dm = FashionMNISTDataModule(str(tmp_path), image_size=14, num_channels=3)
    assert dm.num_channels == 3 and dm.num_classes == 10
    dm.setup()
    test_x = torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).unsqueeze(1)
    expected = F.interpolate(test_x, size=(14, 14), mode="bilinear", antialias=True, align_corners=False)
    assert dm.test_set.images.dtype == torch.uint8 and dm.test_set.images.shape == (5, 3, 14, 14)
    assert torch.equal(dm.test_set.images, expected.repeat(1, 3, 1, 1))


def test_bad_arguments(tmp_path):
    for kwargs, match in [
        (dict(num_channels=2), "num_channels must be 1 or 3"),
        (dict(image_size=0), "image_size must be a positive int"),
        (dict(val_fraction=1.0), "val_fraction"),
        (dict(val_fraction=0.0), "val_fraction must be > 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            FashionMNISTDataModule(str(tmp_path), **kwargs)
    write_split_files(tmp_path, gz=False)
    with pytest.raises(ValueError, match="val_fraction=0.01 of the 20 training images leaves 0 for validation"):
        FashionMNISTDataModule(str(tmp_path), val_fraction=0.01).setup()


def test_train_subset_is_seeded_class_balanced_and_leaves_validation_and_test_alone(tmp_path):
    arrays = write_split_files(tmp_path, gz=False, n_train=400, n_test=5)
    labels = torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long()
    full = FashionMNISTDataModule(str(tmp_path), val_fraction=0.25, seed=2)
    full.setup()
    dm = FashionMNISTDataModule(str(tmp_path), val_fraction=0.25, seed=2, train_subset=50)
    dm.setup()
    assert torch.equal(dm.val_indices, full.val_indices)  # validation is held out of the file as before
    assert torch.equal(dm.test_set.images, full.test_set.images)
    assert len(dm.train_indices) == 50 and len(set(dm.train_indices.tolist())) == 50
    assert set(dm.train_indices.tolist()) <= set(full.train_indices.tolist())  # never a validation image
    assert torch.bincount(labels[dm.train_indices], minlength=10).tolist() == [5] * 10
    assert torch.equal(dm.train_set.labels, labels[dm.train_indices])
    again = FashionMNISTDataModule(str(tmp_path), val_fraction=0.25, seed=2, train_subset=50)
    again.setup()
    other = FashionMNISTDataModule(str(tmp_path), val_fraction=0.25, seed=3, train_subset=50)
    other.setup()
    assert torch.equal(again.train_indices, dm.train_indices) and not torch.equal(other.train_indices, dm.train_indices)
    for bad in (0, 25, 2.5e3, True):
        with pytest.raises(ValueError, match=f"train_subset must be None or a positive multiple of 10 .*; got {bad}"):
            FashionMNISTDataModule(str(tmp_path), train_subset=bad)
    short = FashionMNISTDataModule(str(tmp_path), val_fraction=0.25, train_subset=400)
    with pytest.raises(ValueError, match=r"train_subset=400 needs 40 training images of class \d .*; the training "
                                         r"split has \d+"):
        short.setup()


def test_missing_directory_names_both_ways_to_get_the_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        FashionMNISTDataModule(str(tmp_path / "nowhere")).prepare_data()
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message and all(way in message for way in HOW_TO_GET)


def test_missing_file_is_named(tmp_path):
    write_split_files(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks t10k-labels-idx1-ubyte\[.gz\]") as err:
        read_fashion_mnist(tmp_path)
    assert all(way in str(err.value) for way in HOW_TO_GET)


def _damage_wrong_magic(folder):
    (folder / "train-labels-idx1-ubyte").write_bytes((folder / "t10k-images-idx3-ubyte").read_bytes())


def _damage_truncated(folder):
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])


def _damage_header_only(folder):
    path = folder / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:6])


def _damage_truncated_gz(folder):
    raw = gzip.compress((folder / "train-images-idx3-ubyte").read_bytes())
    (folder / "train-images-idx3-ubyte").unlink()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(raw[: len(raw) // 2])


def _damage_not_gzip(folder):
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes((folder / "t10k-images-idx3-ubyte").read_bytes())
    (folder / "t10k-images-idx3-ubyte").unlink()


def _damage_count_mismatch(folder):
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)))


def _damage_label_range(folder):
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(5, 10, dtype=np.uint8)))


def _damage_image_side(folder):
    (folder / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((5, 32, 32), dtype=np.uint8)))


@pytest.mark.parametrize(
    "damage, match",
    [
        (_damage_wrong_magic, r"train-labels-idx1-ubyte has magic number 0x00000803, expected 0x00000801"),
        (_damage_truncated, r"train-images-idx3-ubyte is truncated: its header promises 20 items"),
        (_damage_header_only, r"t10k-labels-idx1-ubyte is truncated: 6 bytes"),
        (_damage_truncated_gz, r"train-images-idx3-ubyte.gz is not a complete gzip file"),
        (_damage_not_gzip, r"t10k-images-idx3-ubyte.gz is not a complete gzip file"),
        (_damage_count_mismatch, r"has 5 images but .*t10k-labels-idx1-ubyte has 4 labels"),
        (_damage_label_range, r"t10k-labels-idx1-ubyte has labels outside 0..9 \(e.g. 10\)"),
        (_damage_image_side, r"t10k-images-idx3-ubyte holds items of shape \(32, 32\), expected \(28, 28\)"),
    ],
    ids=lambda v: v.__name__[len("_damage_"):] if callable(v) else "",
)
def test_damaged_files_give_clear_errors(tmp_path, damage, match):
    write_split_files(tmp_path, gz=False)
    damage(tmp_path)
    with pytest.raises(CorruptIdxError, match=match) as err:
        FashionMNISTDataModule(str(tmp_path)).setup()
    assert "apt-get install dataset-fashion-mnist" in str(err.value)


def test_real_fashion_mnist():
    """The Debian package's files (installed by .ci/run): sizes, pixels, labels, a reproducible split
    disjoint from test, and a test split that is exactly the t10k file."""
    dm = FashionMNISTDataModule()  # data_dir defaults to the Debian package's directory
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (54_000, 6_000, 10_000)
    for dataset in (dm.train_set, dm.val_set, dm.test_set):
        assert dataset.images.dtype == torch.uint8 and dataset.images.shape[1:] == (1, 28, 28)
        assert dataset.images.min() == 0 and dataset.images.max() == 255
        assert sorted(dataset.labels.unique().tolist()) == list(range(10))
    x, y, _ = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0

    # train and val partition the training file; the split is a function of the seed
    assert not set(dm.train_indices.tolist()) & set(dm.val_indices.tolist())
    assert len(dm.train_indices) + len(dm.val_indices) == 60_000
    val_idx, train_idx = seeded_split(60_000, (0.1,), seed=0)
    assert torch.equal(dm.val_indices, val_idx) and torch.equal(dm.train_indices, train_idx)
    again = FashionMNISTDataModule(seed=0)
    again.setup()
    assert torch.equal(again.val_set.images, dm.val_set.images) and torch.equal(again.train_set.labels, dm.train_set.labels)

    # read independently of the module: the test split is the t10k file, train/val are the training file
    def raw(name, header):
        return np.frombuffer(bytearray(gzip.decompress((Path(DEFAULT_DIR) / f"{name}.gz").read_bytes())[header:]), dtype=np.uint8)

    assert dm.test_set.images.numpy().tobytes() == raw("t10k-images-idx3-ubyte", 16).tobytes()
    assert dm.test_set.labels.tolist() == raw("t10k-labels-idx1-ubyte", 8).tolist()
    train_x = torch.from_numpy(raw("train-images-idx3-ubyte", 16).reshape(60_000, 1, 28, 28))
    train_y = torch.from_numpy(raw("train-labels-idx1-ubyte", 8).astype(np.int64))
    assert torch.equal(dm.train_set.images, train_x[train_idx]) and torch.equal(dm.val_set.images, train_x[val_idx])
    assert torch.equal(dm.train_set.labels, train_y[train_idx]) and torch.equal(dm.val_set.labels, train_y[val_idx])


def test_shipped_extractor_transfers_to_the_real_2500_image_subset():
    """The transfer setting of configs/fashion_mnist/evaluate_transfer.yaml on the real files: the shipped
    extractor (trained on the 54,000-image split) loads from safetensors, and a logistic head fitted on the
    class-balanced 2,500-image subset classifies the real test images as BENCHMARKS.md says (86.0% on all 10,000)."""
    from lightning_defense.attacks.feature_collision import extract_features, fit_linear_head, load_extractor

    path = Path(__file__).resolve().parents[2] / "lightning_defense/assets/fashion_mnist_extractor_14x14.safetensors"
    extractor = load_extractor(path, backbone_kwargs={"width": 16}, num_classes=10, in_chans=1, device="cpu")
    dm = FashionMNISTDataModule(image_size=14, seed=0, train_subset=2500)
    dm.setup()
    x, y = dm.train_tensors()
    xt, yt = dm.test_set.tensors()
    assert torch.bincount(y, minlength=10).tolist() == [250] * 10
    with torch.no_grad():
        head = fit_linear_head(extract_features(extractor, x), y, 10)
        accuracy = (head(extract_features(extractor, xt[:2000])).argmax(1) == yt[:2000]).float().mean().item()
    assert 0.83 < accuracy < 0.90, accuracy

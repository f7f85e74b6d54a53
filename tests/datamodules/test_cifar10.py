import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from lightning_defense.core.store import fingerprint
from lightning_defense.datamodules import CIFAR10DataModule, read_cifar10
from lightning_defense.datamodules.base import seeded_split
from lightning_defense.datamodules.cifar10 import FOLDER_NAME, TEST_BATCH, TRAIN_BATCHES


def _batch_bytes(n, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    return pickle.dumps({b"batch_label": b"x", b"labels": labels, b"data": data}), data, labels


def make_archive(root, as_tar, n=4):
    """A tiny archive in the real CIFAR-10 python format: 5 train batches and a test batch."""
    members, expected = {}, {}
    for i, name in enumerate(TRAIN_BATCHES + [TEST_BATCH]):
        members[name], data, labels = _batch_bytes(n, i)
        expected[name] = (data.reshape(-1, 3, 32, 32), labels)
    if as_tar:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            for name, raw in members.items():
                info = tarfile.TarInfo(f"{FOLDER_NAME}/{name}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    else:
        (root / FOLDER_NAME).mkdir()
        for name, raw in members.items():
            (root / FOLDER_NAME / name).write_bytes(raw)
    return expected


@pytest.mark.parametrize("as_tar", [False, True])
def test_reads_generated_archive(tmp_path, as_tar):
    expected = make_archive(tmp_path, as_tar)
    dm = CIFAR10DataModule(str(tmp_path), val_fraction=0, batch_size=5)  # all 20 training images
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 20 and len(dm.test_set) == 4 and dm.val_set is dm.test_set
    train_x = np.concatenate([expected[n][0] for n in TRAIN_BATCHES])
    assert torch.equal(dm.train_set.images, torch.from_numpy(train_x))
    x, y, idx = next(iter(dm.test_dataloader()))
    assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32)
    torch.testing.assert_close(x, torch.from_numpy(expected[TEST_BATCH][0]).float() / 255)
    assert y.tolist() == expected[TEST_BATCH][1] and idx.tolist() == [0, 1, 2, 3]


def test_default_validation_is_held_out_from_the_training_file_never_test(tmp_path):
    expected = make_archive(tmp_path, as_tar=False, n=40)  # 200 training images, 40 test images
    dm = CIFAR10DataModule(str(tmp_path), seed=2)
    dm.setup("fit")
    assert dm.val_fraction == 0.1 and len(dm.val_set) == 20 and len(dm.train_set) == 180
    assert dm.val_set is not dm.test_set
    train_x = torch.from_numpy(np.concatenate([expected[n][0] for n in TRAIN_BATCHES]))
    val_idx, train_idx = seeded_split(len(train_x), (0.1,), seed=2)  # 5,000 of the real 50,000
    assert torch.equal(dm.val_set.images, train_x[val_idx]) and torch.equal(dm.train_set.images, train_x[train_idx])
    test_keys = {fingerprint(x) for x in torch.from_numpy(expected[TEST_BATCH][0])}
    assert not test_keys & {fingerprint(x) for x in dm.val_set.images}
    assert not test_keys & {fingerprint(x) for x in dm.train_set.images}


def test_val_fraction_holds_out_training_images(tmp_path):
    make_archive(tmp_path, as_tar=False)
    dm = CIFAR10DataModule(str(tmp_path), val_fraction=0.3, seed=1)
    dm.setup()
    assert len(dm.val_set) == 6 and len(dm.train_set) == 14
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="val_fraction"):
            CIFAR10DataModule(str(tmp_path), val_fraction=bad)
    with pytest.raises(ValueError, match="val_fraction=0.01 of the 20 training images leaves 0 for validation"):
        CIFAR10DataModule(str(tmp_path), val_fraction=0.01).setup()


def test_missing_archive_names_path_and_source(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*cifar-10-python.tar.gz"):
        CIFAR10DataModule(str(tmp_path)).prepare_data()


def test_corrupt_archive_and_batch(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(ValueError, match="corrupt.*download"):
        read_cifar10(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    make_archive(other, as_tar=False)
    (other / FOLDER_NAME / TEST_BATCH).write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="test_batch is corrupt"):
        read_cifar10(other)
    os.remove(other / FOLDER_NAME / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        read_cifar10(other)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_batches_cannot_run_code(tmp_path):
    make_archive(tmp_path, as_tar=False)
    (tmp_path / FOLDER_NAME / TEST_BATCH).write_bytes(pickle.dumps({b"data": _Payload(), b"labels": []}))
    with pytest.raises(ValueError, match="refusing to load"):
        read_cifar10(tmp_path)

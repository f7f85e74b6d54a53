import numpy as np
import pytest
import torch
from PIL import Image

from lightning_defense.datamodules import ImageFolderDataModule


def make_folder(root, classes=("cat", "dog"), per_class=5, size=12):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    (root / classes[-1] / "notes.txt").write_text("not an image")


def test_reads_class_folders(tmp_path):
    make_folder(tmp_path / "train")
    dm = ImageFolderDataModule(str(tmp_path / "train"), image_size=8, val_fraction=0.2, test_fraction=0.2, batch_size=4)
    assert dm.classes == ["cat", "dog"] and dm.num_classes == 2 and dm.num_channels == 3
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 10
    x, y, idx = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 8, 8) and 0 <= x.min() and x.max() <= 1
    images, labels = dm.train_tensors()
    torch.testing.assert_close(images[idx], x)
    assert torch.equal(labels[idx], y)


def test_separate_test_root_and_grayscale(tmp_path):
    make_folder(tmp_path / "train")
    make_folder(tmp_path / "test", per_class=2)
    dm = ImageFolderDataModule(str(tmp_path / "train"), test_root=str(tmp_path / "test"), num_channels=1, image_size=8)
    dm.setup()
    assert len(dm.test_set) == 4 and dm.test_set[0][0].shape == (1, 8, 8)


def test_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataModule(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        ImageFolderDataModule(str(tmp_path / "empty"))
    make_folder(tmp_path / "a")
    make_folder(tmp_path / "b", classes=("cat", "fox"))
    dm = ImageFolderDataModule(str(tmp_path / "a"), test_root=str(tmp_path / "b"))
    with pytest.raises(ValueError, match="has classes"):
        dm.setup()


def test_fractions_must_leave_training_data(tmp_path):
    make_folder(tmp_path / "train")
    with pytest.raises(ValueError, match="must leave training data"):
        ImageFolderDataModule(str(tmp_path / "train"), val_fraction=0.5, test_fraction=0.6)

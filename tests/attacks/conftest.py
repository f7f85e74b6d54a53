import pytest
import torch

from lightning_defense.datamodules import DigitsDataModule


@pytest.fixture(scope="session")
def digits16():
    """The digits at 16x16: (train images, train labels, test images, test labels)."""
    dm = DigitsDataModule(image_size=16)
    dm.setup()
    x, y = dm.train_tensors()
    xt, yt = dm.test_set.tensors()
    return x, y, xt, yt


@pytest.fixture(scope="session")
def small_split(digits16):
    """200 training digits at 16x16, for bound and budget checks."""
    x, y, _, _ = digits16
    return x[:200].clone(), y[:200].clone()


def accuracy_of(model, images, labels):
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()

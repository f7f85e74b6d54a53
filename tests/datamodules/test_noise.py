import pytest
import torch

from lightning_defense.datamodules import DigitsDataModule
from lightning_defense.datamodules.noise import GaussianNoiseDataModule, per_sample_normal


def test_noise_depends_only_on_seed_and_index():
    full = per_sample_normal(3, torch.arange(10), (2, 4, 4))
    part = per_sample_normal(3, torch.tensor([7, 2]), (2, 4, 4))
    assert torch.equal(part[0], full[7]) and torch.equal(part[1], full[2])
    assert not torch.equal(per_sample_normal(4, torch.arange(10), (2, 4, 4)), full)


def test_gaussian_training_set_has_sigma_noise_and_clean_test_set():
    clean = DigitsDataModule(image_size=8)
    clean.setup()
    dm = GaussianNoiseDataModule(DigitsDataModule(image_size=8), sigma=0.25, seed=1)
    dm.setup()
    noisy, labels = dm.train_tensors()
    diff = noisy - clean.train_set.images
    assert abs(diff.std().item() - 0.25) < 0.01 and abs(diff.mean().item()) < 0.01
    assert torch.equal(labels, clean.train_set.labels)
    assert torch.equal(dm.test_set.images, clean.test_set.images)


def test_sigma_must_be_positive():
    with pytest.raises(ValueError, match="sigma must be > 0"):
        GaussianNoiseDataModule(DigitsDataModule(), sigma=0.0)


def test_certified_sigma_is_its_sigma():
    assert GaussianNoiseDataModule(DigitsDataModule(), sigma=0.4, seed=2).certified_sigma == 0.4

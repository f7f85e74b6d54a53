import pytest
import torch

from lightning_defense.datamodules import DigitsDataModule, PoisonedDataModule, PoisonSet, PoisonSetError


def _poisons(dm, eps=8 / 255, n=10, scale=1.0):
    images, labels = dm.train_tensors()
    idx = torch.arange(0, 5 * n, 5)
    delta = scale * eps * torch.sign(torch.randn(images[idx].shape, generator=torch.Generator().manual_seed(0)))
    return PoisonSet(indices=idx, images=(images[idx] + delta).clamp(0, 1), labels=labels[idx], norm="linf", eps=eps, kind="indiscriminate")


def test_replaces_only_poisoned_training_samples(tmp_path):
    clean = DigitsDataModule(image_size=8)
    clean.setup()
    poisons = _poisons(clean)
    poisons.save(tmp_path / "p.safetensors")
    dm = PoisonedDataModule(DigitsDataModule(image_size=8), str(tmp_path / "p.safetensors"))
    assert dm.num_classes == 10 and dm.num_channels == 1
    dm.setup("fit")
    x, _ = dm.train_tensors()
    x0, _ = clean.train_tensors()
    changed = (x != x0).flatten(1).any(1).nonzero().flatten()
    assert torch.equal(changed, poisons.indices)
    torch.testing.assert_close(x[poisons.indices], poisons.images)
    assert torch.equal(dm.test_set.images, clean.test_set.images)
    assert torch.equal(dm.val_set.images, clean.val_set.images)
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 3


def test_poisons_over_the_bound_are_refused():
    clean = DigitsDataModule(image_size=8)
    clean.setup()
    bad = _poisons(clean, scale=3.0)
    dm = PoisonedDataModule(DigitsDataModule(image_size=8), bad)
    with pytest.raises(PoisonSetError, match="eps"):
        dm.setup()


def test_argument_errors():
    with pytest.raises(TypeError, match="base must be a LightningDataModule"):
        PoisonedDataModule(object(), "p.npz")
    with pytest.raises(TypeError, match="poisons must be"):
        PoisonedDataModule(DigitsDataModule(), 3)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        PoisonedDataModule(DigitsDataModule(image_size=8), "missing.npz").setup()

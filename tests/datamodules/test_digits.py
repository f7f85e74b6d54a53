import pytest
import torch

from lightning_defense.datamodules import DigitsDataModule


def test_batches_are_unnormalised_images_labels_and_indices():
    dm = DigitsDataModule(image_size=16, batch_size=32)
    dm.setup("fit")
    x, y, idx = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 16, 16) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
    assert y.dtype == torch.long and set(y.tolist()) <= set(range(10))
    images, labels = dm.train_tensors()
    torch.testing.assert_close(images[idx], x)  # each index names its sample in the split
    assert torch.equal(labels[idx], y)


def test_split_sizes_disjoint_and_reproducible():
    a, b, c = DigitsDataModule(seed=3), DigitsDataModule(seed=3), DigitsDataModule(seed=4)
    for dm in (a, b, c):
        dm.setup()
    assert len(a.train_set) + len(a.val_set) + len(a.test_set) == 1797
    assert len(a.test_set) == round(0.2 * 1797) and len(a.val_set) == round(0.1 * 1797)
    assert torch.equal(a.train_set.images, b.train_set.images)
    assert not torch.equal(a.test_set.images, c.test_set.images)
    # no image appears in two splits (digits has a few exact duplicates, so compare by position)
    flat = lambda s: {tuple(row.tolist()) for row in s.images.flatten(1)}  # noqa: E731
    assert len(flat(a.train_set) & flat(a.test_set)) <= 5


def test_three_channel_repeats_gray():
    dm = DigitsDataModule(num_channels=3, image_size=8)
    dm.setup()
    x = dm.train_set.images
    assert x.shape[1:] == (3, 8, 8) and torch.equal(x[:, 0], x[:, 2])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image_size": 4}, "image_size must be >= 8"),
        ({"num_channels": 2}, "num_channels must be 1 or 3"),
        ({"val_fraction": 1.5}, "val_fraction must be in"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "must leave training data"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_loader_before_setup_is_a_clear_error():
    with pytest.raises(RuntimeError, match="call setup"):
        DigitsDataModule().train_dataloader()

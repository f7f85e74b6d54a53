import pytest
import torch

from lightning_defense.datamodules import DigitsDataModule
from lightning_defense.datamodules.shortcut_squeezing import ShortcutSqueezeDataModule, grayscale, jpeg_compress


def test_grayscale_is_luma_in_every_channel():
    x = torch.rand(4, 3, 8, 8)
    g = grayscale(x)
    assert g.shape == x.shape and torch.equal(g[:, 0], g[:, 2])
    torch.testing.assert_close(g[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])
    one = torch.rand(2, 1, 8, 8)
    assert torch.equal(grayscale(one), one)


def test_jpeg_removes_high_frequency_noise_and_keeps_range():
    smooth = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(8, 3, 16, 16).contiguous()
    noise = 0.1 * torch.sign(torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    out = jpeg_compress((smooth + noise).clamp(0, 1), quality=10)
    assert out.shape == smooth.shape and out.min() >= 0 and out.max() <= 1
    # the +-0.1 checkerboard-like noise is mostly squeezed out
    assert (out - smooth).abs().mean() < 0.6 * noise.abs().mean()
    assert (jpeg_compress(smooth, 95) - smooth).abs().max() < 0.05


def test_wrapper_squeezes_training_split_only():
    dm = ShortcutSqueezeDataModule(DigitsDataModule(image_size=16, num_channels=3), method="jpeg", quality=10)
    clean = DigitsDataModule(image_size=16, num_channels=3)
    dm.setup()
    clean.setup()
    x, y = dm.train_tensors()
    assert x.shape == clean.train_set.images.shape and 0 <= x.min() and x.max() <= 1
    assert not torch.equal(x, clean.train_set.images) and torch.equal(y, clean.train_set.labels)
    assert torch.equal(dm.test_set.images, clean.test_set.images)


@pytest.mark.parametrize("kwargs, match", [({"method": "blur"}, "method must be one of"), ({"quality": 0}, "quality must be in")])
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShortcutSqueezeDataModule(DigitsDataModule(), **kwargs)


class NormalisedDigits(DigitsDataModule):
    """Digits normalised with mean/std 0.5 in the datamodule: values in [-1, 1] (the mistake the error names)."""

    def setup(self, stage=None):
        super().setup(stage)
        self.train_set.images = (self.train_set.images - 0.5) / 0.5


@pytest.mark.parametrize("method", ["jpeg", "grayscale"])
def test_training_images_outside_the_unit_range_are_refused_not_clamped(method):
    dm = ShortcutSqueezeDataModule(NormalisedDigits(image_size=8), method=method)
    with pytest.raises(ValueError, match=r"ShortcutSqueezeDataModule: got training images of NormalisedDigits with "
                                         r"values in \[-1, 1\], outside \[0, 1\].*normalise inside the LightningModule"):
        dm.setup("fit")
    with pytest.raises(ValueError, match=r"jpeg_compress: got images with values in \[-0.5, 1\]"):
        jpeg_compress(torch.linspace(-0.5, 1, 64).view(1, 1, 8, 8), quality=10)

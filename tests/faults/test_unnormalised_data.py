"""Issue #15: FRIENDS and adversarial training clamp their perturbed images to [0, 1]. Given normalised
images (e.g. mean/std 0.5: values in [-1, 1]) that clamp would silently destroy half of every image, so
they refuse such data with a clear error instead."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_defense.callbacks import AdversarialTraining, FriendsNoise
from lightning_defense.core.batch import IndexedDataset
from lightning_defense.models import ImageClassifier


def _message(who, what="training batch"):
    return (rf"{who}: got {what} with values in \[-1, [-.0-9e]+\], outside \[0, 1\]\. These callbacks act on un-normalised "
            r"pixels in \[0, 1\].*normalise inside the LightningModule, e.g\. ImageClassifier\(mean=\.\.\., std=\.\.\.\)")


def _normalised_batch(n=4):
    x = torch.linspace(0, 1, n * 64).reshape(n, 1, 8, 8)
    return [(x - 0.5) / 0.5, torch.zeros(n, dtype=torch.long), torch.arange(n)]  # mean/std 0.5: [-1, 1]


def _model():
    return ImageClassifier("small_cnn", num_classes=2, in_chans=1, lr=0.05, crop_padding=0, flip=False,
                           backbone_kwargs={"width": 4})


class NormalisedData(L.LightningDataModule):
    """16 images normalised with mean/std 0.5 by the data pipeline (the mistake the error names)."""

    def setup(self, stage=None):
        images, labels, _ = _normalised_batch(16)
        self.train_set = IndexedDataset(images, labels)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=8)


def _fit(callback, tmp_path):
    L.Trainer(accelerator="cpu", max_epochs=1, limit_val_batches=0, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
              callbacks=[callback]).fit(_model(), datamodule=NormalisedData())


def test_adversarial_training_refuses_normalised_batches(tmp_path):
    trainer = SimpleNamespace(current_epoch=0, global_rank=0)
    with pytest.raises(ValueError, match=_message("AdversarialTraining")):
        AdversarialTraining().on_train_batch_start(trainer, _model(), _normalised_batch(), 0)
    with pytest.raises(ValueError, match=_message("AdversarialTraining")):
        _fit(AdversarialTraining(steps=1), tmp_path)


@pytest.mark.parametrize("noise_type", ["bernoulli", "uniform", "gaussian"])
def test_friends_random_phase_refuses_normalised_batches(noise_type):
    trainer = SimpleNamespace(current_epoch=0, global_rank=0)  # before begin_epoch: random noise only
    batch = _normalised_batch()
    with pytest.raises(ValueError, match=_message("FriendsNoise")):
        FriendsNoise(begin_epoch=5, noise_type=noise_type).on_train_batch_start(trainer, None, batch, 0)
    assert batch[0].min() == -1  # untouched


@pytest.mark.parametrize("noise_type", ["bernoulli", None])
def test_friends_friendly_phase_refuses_normalised_batches(noise_type):
    friends = FriendsNoise(begin_epoch=0, noise_type=noise_type)
    friends._set_noise(torch.zeros(4, 1, 8, 8, dtype=torch.int8))
    trainer = SimpleNamespace(current_epoch=0, global_rank=0)
    with pytest.raises(ValueError, match=_message("FriendsNoise")):
        friends.on_train_batch_start(trainer, None, _normalised_batch(), 0)


def test_friends_refuses_to_generate_friendly_noise_on_a_normalised_training_set(tmp_path, monkeypatch):
    monkeypatch.setattr(FriendsNoise, "_friendly_range", lambda *a: pytest.fail("must not run Algorithm 1"))
    with pytest.raises(ValueError, match=_message("FriendsNoise", "training set")):
        _fit(FriendsNoise(begin_epoch=0, steps=1, batch_size=8), tmp_path)


def test_pixels_in_range_are_still_perturbed_and_clamped():
    """Clamping a correct [0, 1] batch after adding noise is the paper's algorithm, and stays."""
    x = torch.linspace(0, 1, 4 * 64).reshape(4, 1, 8, 8)
    batch = [x.clone(), torch.zeros(4, dtype=torch.long), torch.arange(4)]
    FriendsNoise(begin_epoch=5, noise_type="bernoulli").on_train_batch_start(
        SimpleNamespace(current_epoch=0, global_rank=0), None, batch, 0)
    assert batch[0].min() == 0 and batch[0].max() == 1 and not torch.equal(batch[0], x)

import csv
import os
from pathlib import Path
import subprocess
import sys

import lightning as L
from lightning.pytorch.loggers import CSVLogger
import pytest
import torch

from lightning_defense.datamodules import DigitsDataModule
from lightning_defense.models import CifarResNet18, ImageClassifier, SmallCNN, build_backbone, paper_milestones, random_crop_flip

ROOT = Path(__file__).resolve().parents[2]


def test_random_crop_flip_moves_pixels_within_padding():
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3, 3] = 1.0
    out = random_crop_flip(x, padding=2, flip=False, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    pos = out.flatten(1).argmax(1)
    rows, cols = pos // 8, pos % 8
    assert rows.min() >= 1 and rows.max() <= 5 and cols.min() >= 1 and cols.max() <= 5
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 5  # crops differ per sample
    flipped = random_crop_flip(x, padding=0, flip=True, generator=torch.Generator().manual_seed(0))
    n_flipped = (flipped[:, 0, 3, 4] == 1).sum()
    assert 10 < n_flipped < 54 and torch.equal(flipped.sum((1, 2, 3)), x.sum((1, 2, 3)))


def test_paper_milestones():
    assert paper_milestones(80) == [30, 50, 70]  # FRIENDS' recipe for 80 epochs
    assert paper_milestones(40) == [15, 25, 35]
    assert paper_milestones(1) == [1] and paper_milestones(2) == [1, 2]  # short runs start at full lr


def test_backbones_shapes():
    x = torch.rand(2, 3, 32, 32)
    assert SmallCNN(7, 3)(x).shape == (2, 7)
    assert CifarResNet18(10, 3)(x).shape == (2, 10)
    assert CifarResNet18(10, 3, norm="group")(x).shape == (2, 10)
    assert build_backbone("resnet18", 5, 3)(x).shape == (2, 5)  # a timm model by name
    with pytest.raises(ValueError, match="unknown backbone 'nope'"):
        build_backbone("nope", 10, 3)


def test_normalisation_belongs_to_the_model():
    model = ImageClassifier("small_cnn", num_classes=10, in_chans=3, mean=[0.1, 0.2, 0.3], std=0.5)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(model.normalize(x), (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / 0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 1}, "num_classes must be >= 2"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"mean": [0.5, 0.5]}, "mean needs 1 or in_chans=3"),
        ({"std": 0.0}, "std must be > 0"),
        ({"crop_padding": -1}, "crop_padding must be >= 0"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageClassifier(**kwargs)


def test_learns_digits(quiet_trainer_kwargs):
    L.seed_everything(0)
    dm = DigitsDataModule(image_size=16, batch_size=64)
    model = ImageClassifier("small_cnn", num_classes=10, in_chans=1, lr=0.05, crop_padding=1, flip=False)
    trainer = L.Trainer(max_epochs=3, **quiet_trainer_kwargs)
    trainer.fit(model, datamodule=dm)
    acc = trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
    assert acc > 0.8  # chance is 0.1
    preds = torch.cat(trainer.predict(model, datamodule=dm))
    assert preds.shape == (len(dm.test_set),)


class _LogSpy(ImageClassifier):
    """Records the global step of every ``self.log("train/loss", ...)``."""

    logged: list

    def log(self, name, value, *args, **kwargs):
        if name == "train/loss":
            self.logged.append(self.global_step + 1)
        super().log(name, value, *args, **kwargs)


@pytest.mark.parametrize("progress_bar", [False, True])
def test_step_loss_is_logged_where_it_is_read(quiet_trainer_kwargs, progress_bar):
    # self.log costs about 0.8 ms a step on CPU: without a progress bar the loss is logged at the loggers'
    # cadence (every log_every_n_steps) and at each epoch's last batch, so callbacks see each epoch's last value.
    dm = DigitsDataModule(image_size=8, batch_size=256)  # 1,258 training images: 5 batches an epoch
    model = _LogSpy("small_cnn", num_classes=10, in_chans=1, lr=0.05, backbone_kwargs={"width": 4})
    model.logged = []
    kwargs = dict(quiet_trainer_kwargs, enable_progress_bar=progress_bar)
    trainer = L.Trainer(max_epochs=2, log_every_n_steps=3, **kwargs)
    trainer.fit(model, datamodule=dm)
    assert trainer.num_training_batches == 5
    assert model.logged == (list(range(1, 11)) if progress_bar else [3, 5, 6, 9, 10])
    assert trainer.callback_metrics["train/loss"] > 0  # the last batch's loss, seen by callbacks
    assert "train/acc" in trainer.callback_metrics  # logged once per epoch either way


def test_loggers_still_get_the_step_loss_at_their_cadence(quiet_trainer_kwargs, tmp_path):
    dm = DigitsDataModule(image_size=8, batch_size=256)
    model = ImageClassifier("small_cnn", num_classes=10, in_chans=1, lr=0.05, backbone_kwargs={"width": 4})
    kwargs = dict(quiet_trainer_kwargs, logger=CSVLogger(tmp_path, name="log", version=0))
    L.Trainer(max_epochs=2, log_every_n_steps=3, **kwargs).fit(model, datamodule=dm)
    with open(tmp_path / "log" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == [2, 5, 8]  # Lightning writes step metrics at steps 3, 6, 9 (its logger steps count from 0)


def test_train_accuracy_counts_every_ranks_samples(tmp_path):
    # The weights stay put (lr 1e-12), so the epoch's training accuracy is the model's accuracy on the training split:
    # on one process, and on two DDP processes whose halves of the split sync to the same figure
    from tests.models.ddp_train_acc_script import fit

    trainer, model, dm = fit(1, tmp_path)
    x, y = dm.train_tensors()
    with torch.no_grad():
        expected = (model(x).argmax(1) == y).float().mean().item()
    assert 0.02 < expected < 0.5  # an untrained model: neither all wrong nor all right, so a miscount shows
    assert trainer.callback_metrics["train/acc"].item() == pytest.approx(expected, abs=1e-6)
    script = Path(__file__).with_name("ddp_train_acc_script.py")
    proc = subprocess.run([sys.executable, str(script), "2", str(tmp_path / "acc.txt")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float((tmp_path / "acc.txt").read_text()) == pytest.approx(expected, abs=1e-6)

"""Issue #15.4: a resumed fit must be the fit it resumes.

A fit killed after epoch k and resumed from its checkpoint by a new Trainer must end with exactly the
weights of an uninterrupted fit: the training loader's shuffle is a function of (loader seed, epoch), not
of how often the loader was built, and the crop/flip augmentation draws from the model's own stream,
keyed by a seed kept in the checkpoint and (epoch, batch, rank), not from the global RNG.
"""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_defense.cli import build_cli
from lightning_defense.datamodules import DigitsDataModule
from lightning_defense.models import ImageClassifier

ROOT = Path(__file__).resolve().parents[2]
EPOCHS, CRASH_EPOCH = 4, 2


def tiny_digits(num_workers: int = 0) -> DigitsDataModule:
    """180 training digits at 8x8, in batches of 32 (6 per epoch)."""
    return DigitsDataModule(image_size=8, val_fraction=0.05, test_fraction=0.85, batch_size=32, seed=0,
                            num_workers=num_workers)


def tiny_model() -> ImageClassifier:
    """Random crop (padding 2) and flip: the augmentation draws on every step."""
    return ImageClassifier("small_cnn", num_classes=10, in_chans=1, lr=0.05, crop_padding=2, flip=True,
                           milestones=[3], backbone_kwargs={"width": 4})


class RecordBatches(L.Callback):
    def __init__(self):
        self.steps = []  # (epoch, sample indices) per training batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append((trainer.current_epoch, batch[2].tolist()))


class CrashAt(L.Callback):
    """Kills the fit when epoch ``epoch`` starts (after the checkpoint of epoch ``epoch - 1`` is written)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def trainer_kwargs(root, **kwargs) -> dict:
    defaults = dict(accelerator="cpu", devices=1, max_epochs=EPOCHS, limit_val_batches=0, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root))
    return {**defaults, **kwargs}


def weights(model) -> torch.Tensor:
    return torch.cat([t.detach().flatten().float() for t in model.state_dict().values()])


@pytest.mark.parametrize("num_workers", [0, 1])  # workers start drawing indices before Lightning's set_epoch
def test_a_killed_and_resumed_fit_ends_with_the_uninterrupted_weights(tmp_path, num_workers):
    L.seed_everything(0)
    whole, whole_model = RecordBatches(), tiny_model()
    L.Trainer(callbacks=[whole], enable_checkpointing=False, **trainer_kwargs(tmp_path / "whole")).fit(
        whole_model, datamodule=tiny_digits(num_workers))

    L.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        L.Trainer(callbacks=[checkpoint, CrashAt(CRASH_EPOCH)], **trainer_kwargs(tmp_path / "crashed")).fit(
            tiny_model(), datamodule=tiny_digits(num_workers))
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == CRASH_EPOCH - 1

    L.seed_everything(0)
    torch.manual_seed(1234)  # the global RNG at resume differs from the uninterrupted run's at that epoch
    resumed, resumed_model = RecordBatches(), tiny_model()
    L.Trainer(callbacks=[resumed], enable_checkpointing=False, **trainer_kwargs(tmp_path / "resumed")).fit(
        resumed_model, datamodule=tiny_digits(num_workers), ckpt_path=str(last))

    later = [step for step in whole.steps if step[0] >= CRASH_EPOCH]
    assert len(later) == 6 * (EPOCHS - CRASH_EPOCH) and resumed.steps == later  # the same batches, in order
    first_epoch = [idx for epoch, idx in whole.steps if epoch == 0]
    assert resumed.steps[0][1] != first_epoch[0]  # not epoch 0's order again
    assert torch.equal(weights(resumed_model), weights(whole_model))


def test_a_rebuilt_training_loader_keeps_the_epoch_order(tmp_path):
    """Lightning may build the training loader again (on resume, or every epoch): the order must not restart."""
    runs = []
    for reload in (0, 1):
        L.seed_everything(0)
        record, model = RecordBatches(), tiny_model()
        L.Trainer(callbacks=[record], enable_checkpointing=False, reload_dataloaders_every_n_epochs=reload,
                  **trainer_kwargs(tmp_path)).fit(
            model, datamodule=tiny_digits())
        runs.append((record.steps, weights(model)))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    orders = [[i for e, idx in runs[0][0] if e == epoch for i in idx] for epoch in range(EPOCHS)]
    assert all(sorted(order) == sorted(orders[0]) for order in orders) and len({tuple(o) for o in orders}) == EPOCHS


@pytest.mark.parametrize("num_workers", [0, 1])
def test_two_process_ddp_resume_ends_with_the_uninterrupted_weights(tmp_path, num_workers):
    """Lightning's DistributedSampler shuffles under DDP; the resumed fit must continue its epochs too."""
    script = Path(__file__).with_name("ddp_resume_script.py")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(num_workers)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    for rank in range(2):
        later = [step for step in result["whole"][rank] if step[0] >= CRASH_EPOCH]
        assert later and result["resumed"][rank] == later
    for rank in range(2):
        assert torch.equal(result["resumed_weights"][rank], result["whole_weights"][rank])
    data = tiny_digits()
    data.setup("fit")
    sampler = data.train_dataloader().sampler
    for epoch in range(EPOCHS):  # Lightning's DistributedSampler: rank r reads positions r, r + 2, ... of the
        sampler.set_epoch(epoch)  # one-process order of the epoch (seed_everything's seed = the loader's)
        order = list(sampler)
        for rank in range(2):
            assert [i for e, idx in result["whole"][rank] if e == epoch for i in idx] == order[rank::2]


def _cli(*args):
    tiny = ["--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
            "--trainer.enable_progress_bar=false", "--trainer.logger=false", "--data.init_args.image_size=8",
            "--model.milestones=[2]"]  # a schedule that does not depend on max_epochs
    return build_cli(["fit", "--config", str(ROOT / "configs" / "digits" / "baseline.yaml"), *tiny, *args])


def test_the_readme_resume_command(tmp_path):
    """``lightning-defense fit --config configs/digits/baseline.yaml --ckpt_path .../last.ckpt`` continues the run."""
    whole = _cli("--trainer.max_epochs=3", f"--trainer.default_root_dir={tmp_path / 'whole'}")
    first = _cli("--trainer.max_epochs=2", f"--trainer.default_root_dir={tmp_path / 'run'}")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"  # the config's ModelCheckpoint(save_last=True)
    assert last.is_file() and first.trainer.current_epoch == 2
    resumed = _cli("--trainer.max_epochs=3", f"--trainer.default_root_dir={tmp_path / 'run'}", f"--ckpt_path={last}")
    assert resumed.trainer.current_epoch == 3
    assert torch.equal(weights(resumed.model), weights(whole.model))
    assert torch.load(last, weights_only=False)["epoch"] == 2  # the resumed run rewrote last.ckpt

    tested = build_cli(["test", "--config", str(ROOT / "configs" / "digits" / "baseline.yaml"),
                        "--trainer.limit_test_batches=1", "--trainer.logger=false", "--data.init_args.image_size=8",
                        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path / 'run'}",
                        f"--ckpt_path={last}"])
    assert "test/acc" in tested.trainer.callback_metrics


def test_a_checkpoint_without_the_augmentation_seed_warns(tmp_path):
    """Checkpoints written before the seed was saved: a warning that the resumed fit augments anew."""
    L.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    L.Trainer(callbacks=[checkpoint], **trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=1)).fit(
        tiny_model(), datamodule=tiny_digits())
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert isinstance(state.pop("augment_seed"), int)
    torch.save(state, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match="no augmentation seed.*not the uninterrupted fit"):
        L.Trainer(enable_checkpointing=False, **trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=1)).fit(
            tiny_model(), datamodule=tiny_digits(), ckpt_path=str(tmp_path / "old.ckpt"))

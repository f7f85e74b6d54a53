"""Issue #15: a DP-SGD fit resumed from a checkpoint must not replay the noise or the Poisson batches.

Reused Gaussian noise can cancel between updates, so a resumed run that restarts the noise and sampler
streams spends privacy the accountant never counted. A resumed run must see exactly the batches and
noise of an uninterrupted one.
"""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_defense.callbacks.dp_sgd import DPSGD
from lightning_defense.datamodules import DigitsDataModule
from lightning_defense.models import ImageClassifier


def _digits():
    return DigitsDataModule(image_size=8, val_fraction=0.05, test_fraction=0.85, batch_size=32, seed=0)  # 180 samples


def _model():  # no random augmentation: only DPSGD's streams make the run random
    return ImageClassifier("small_cnn", num_classes=10, in_chans=1, lr=0.1, momentum=0.9, crop_padding=0, flip=False,
                           backbone_kwargs={"width": 4, "norm": "group"})


class RecordBatches(L.Callback):
    def __init__(self):
        self.steps = []  # (epoch, sampled indices) per optimizer step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append((trainer.current_epoch, batch[2].clone()))


class Crash(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")


def _trainer(tmp_path, callbacks, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, max_epochs=3, limit_val_batches=0, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    return L.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("limit_train_batches", [None, 3])  # whole epochs, and epochs cut short (a prefetched batch)
def test_resumed_run_continues_the_noise_and_the_batches(tmp_path, limit_train_batches):
    limit = {} if limit_train_batches is None else {"limit_train_batches": limit_train_batches}
    L.seed_everything(0)
    whole, whole_dp, whole_model = RecordBatches(), DPSGD(noise_multiplier=1.0, max_grad_norm=1.0), _model()
    _trainer(tmp_path / "whole", [whole_dp, whole], enable_checkpointing=False, **limit).fit(whole_model, datamodule=_digits())

    L.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(tmp_path / "crashed", [DPSGD(noise_multiplier=1.0, max_grad_norm=1.0), checkpoint, Crash()],
                 **limit).fit(_model(), datamodule=_digits())
    ckpt = tmp_path / "ckpt" / "epoch=0-step={}.ckpt".format(limit_train_batches or len(whole.steps) // 3)
    assert ckpt.is_file(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())

    L.seed_everything(1)  # the global RNG must not matter
    resumed, resumed_dp, resumed_model = RecordBatches(), DPSGD(noise_multiplier=1.0, max_grad_norm=1.0), _model()
    _trainer(tmp_path / "resumed", [resumed_dp, resumed], enable_checkpointing=False, **limit).fit(
        resumed_model, datamodule=_digits(), ckpt_path=str(ckpt))

    later = [(epoch, idx) for epoch, idx in whole.steps if epoch >= 1]
    assert [e for e, _ in resumed.steps] == [e for e, _ in later] and len(later) >= 4
    for (_, expected), (_, seen) in zip(later, resumed.steps):
        assert torch.equal(seen, expected)
    first_epoch = [idx for epoch, idx in whole.steps if epoch == 0]
    assert not torch.equal(resumed.steps[0][1], first_epoch[0])  # not epoch 0's batches again
    assert torch.equal(_weights(resumed_model), _weights(whole_model))  # same noise, same updates
    assert resumed_dp.epsilon == pytest.approx(whole_dp.epsilon, rel=1e-12) and whole_dp.epsilon > 0


def test_two_process_ddp_resume_continues_every_ranks_streams(tmp_path):
    """Each rank samples its own shard with its own stream: the checkpoint keeps both ranks' states."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = Path(__file__).with_name("ddp_dp_sgd_resume_script.py")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert result["saved_ranks"] == 2
    for rank in range(2):
        later = [step for step in result["whole"][rank] if step[0] >= 1]
        assert later and result["resumed"][rank] == later
    assert result["whole"][0][0][1] != result["whole"][1][0][1]  # the ranks' streams differ
    assert torch.equal(result["weights"][0], result["weights"][1])
    assert result["epsilon"][0] == pytest.approx(result["epsilon"][1], rel=1e-12) and result["epsilon"][0] > 0


def test_a_rebuilt_training_loader_continues_the_sampler_stream(tmp_path):
    """Rebuilding the training loader every epoch must not restart the Poisson sampler's stream."""
    runs = []
    for reload in (0, 1):
        L.seed_everything(0)
        record = RecordBatches()
        _trainer(tmp_path, [DPSGD(), record], max_epochs=2, enable_checkpointing=False,
                 reload_dataloaders_every_n_epochs=reload).fit(_model(), datamodule=_digits())
        runs.append(record.steps)
    assert [e for e, _ in runs[0]] == [e for e, _ in runs[1]] and runs[0][-1][0] == 1
    for (_, kept), (_, rebuilt) in zip(*runs):
        assert torch.equal(kept, rebuilt)


def test_a_checkpoint_without_stream_states_starts_new_streams(tmp_path):
    """Checkpoints written before the streams were saved: a warning and new streams, never a replay."""
    L.seed_everything(0)
    first = RecordBatches()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    dp = DPSGD()
    _trainer(tmp_path, [dp, first, checkpoint], max_epochs=1).fit(_model(), datamodule=_digits())
    (ckpt,) = (tmp_path / "ckpt").glob("epoch=0-*.ckpt")
    state = torch.load(ckpt, weights_only=False)
    assert len(state["callbacks"][dp.state_key]["generators"]) == 1
    del state["callbacks"][dp.state_key]["generators"]
    torch.save(state, tmp_path / "old.ckpt")

    resumed = RecordBatches()
    with pytest.warns(UserWarning, match="no sampler stream state for rank 0.*new streams keyed by the resumed step"):
        _trainer(tmp_path, [DPSGD(), resumed], max_epochs=2, enable_checkpointing=False).fit(
            _model(), datamodule=_digits(), ckpt_path=str(tmp_path / "old.ckpt"))
    assert resumed.steps and not torch.equal(resumed.steps[0][1], first.steps[0][1])

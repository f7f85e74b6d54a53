import math
import types
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_defense.callbacks import AdversarialTraining, FriendsNoise
from lightning_defense.callbacks.dp_sgd import DPSGD
from lightning_defense.datamodules import DigitsDataModule
from lightning_defense.models import ImageClassifier


def _model(norm="group"):
    return ImageClassifier(
        "small_cnn", num_classes=10, in_chans=1, lr=1.0, momentum=0.0, weight_decay=0.0, crop_padding=0,
        flip=False, milestones=[100], backbone_kwargs={"width": 4, "norm": norm},
    )


class RecordFirstStep(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.batch = [t.clone() for t in batch]
            self.before = {k: v.clone() for k, v in pl_module.named_parameters()}


def _assert_step_is_mean_of_clipped_per_sample_gradients(model, record, clip):
    """Independent computation: per-sample gradients one by one, clipped to ``clip``, averaged."""
    reference = _model()
    reference.load_state_dict({**reference.state_dict(), **record.before})
    x, y, _ = record.batch
    names = [n for n, _ in reference.named_parameters()]
    clipped, norms = [], []
    for i in range(len(x)):
        grads = torch.autograd.grad(F.cross_entropy(reference(x[i : i + 1]), y[i : i + 1]), list(reference.parameters()))
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        norms.append(norm)
        clipped.append([g * min(1.0, clip / (norm.item() + 1e-6)) for g in grads])
    assert min(norms) > clip  # clipping is active for every sample, so a missing clip would show
    expected_step = [sum(c[j] for c in clipped) / len(x) for j in range(len(names))]
    after = dict(model.named_parameters())
    for name, step in zip(names, expected_step):
        torch.testing.assert_close(record.before[name] - after[name].detach(), step, atol=1e-5, rtol=1e-3)


def test_update_is_the_mean_of_clipped_per_sample_gradients(quiet_trainer_kwargs):
    L.seed_everything(0)
    clip = 0.05
    model, record = _model(), RecordFirstStep()
    dp = DPSGD(noise_multiplier=0.0, max_grad_norm=clip, poisson_sampling=False)
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, callbacks=[dp, record], **quiet_trainer_kwargs)
    trainer.fit(model, datamodule=DigitsDataModule(image_size=8, batch_size=16))
    _assert_step_is_mean_of_clipped_per_sample_gradients(model, record, clip)


def test_adversarial_training_under_dp_sgd_clips_the_adversarial_batch_only(quiet_trainer_kwargs):
    """PGD's own forward/backward passes run with Opacus' capture paused: the step is the mean of the clipped
    per-sample gradients of the adversarial batch, as if PGD had not run through the hooked model."""
    L.seed_everything(0)
    clip = 0.05
    model, record = _model(), RecordFirstStep()  # after AdversarialTraining: it records the adversarial batch
    dp = DPSGD(noise_multiplier=0.0, max_grad_norm=clip, poisson_sampling=False)
    callbacks = [dp, AdversarialTraining(eps=8 / 255, steps=2), record]
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, callbacks=callbacks, **quiet_trainer_kwargs)
    dm = DigitsDataModule(image_size=8, batch_size=16)
    trainer.fit(model, datamodule=dm)
    clean = next(iter(dm.train_dataloader()))[0]
    assert 0 < (record.batch[0] - clean).abs().max() <= 8 / 255 + 1e-6  # the recorded batch is PGD's
    _assert_step_is_mean_of_clipped_per_sample_gradients(model, record, clip)
    assert dp._grad_sample_module.hooks_enabled  # capture is back on for the training steps


def test_friendly_noise_under_dp_sgd(quiet_trainer_kwargs):
    """FRIENDS' Algorithm 1 (extra forward/backward passes) runs inside a DP-SGD fit."""
    L.seed_everything(0)
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0)
    friends = FriendsNoise(begin_epoch=1, steps=2, batch_size=64)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=0, callbacks=[dp, friends],
                        **quiet_trainer_kwargs)
    trainer.fit(_model(), datamodule=DigitsDataModule(image_size=8, batch_size=32))
    assert friends.friendly_noise is not None and friends.friendly_noise.abs().max() > 0
    assert dp.epsilon > 0 and dp._grad_sample_module.hooks_enabled


def test_reports_finite_epsilon_and_resumes_its_accountant(tmp_path):
    L.seed_everything(0)
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    kwargs = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer = L.Trainer(max_epochs=1, limit_train_batches=5, limit_val_batches=0, callbacks=[dp], **kwargs)
    trainer.fit(_model(), datamodule=DigitsDataModule(image_size=8, batch_size=32))
    eps_one = dp.epsilon
    assert 0 < eps_one < 100 and math.isfinite(eps_one)
    assert trainer.callback_metrics["dp/epsilon"] == pytest.approx(eps_one)
    ckpt = next(Path(tmp_path).rglob("*.ckpt"))

    resumed = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=5, limit_val_batches=0, callbacks=[resumed], **kwargs)
    trainer.fit(_model(), datamodule=DigitsDataModule(image_size=8, batch_size=32), ckpt_path=str(ckpt))
    assert len(resumed._accountant.history) >= 1 and resumed.epsilon > eps_one  # privacy spent keeps adding up


def test_batchnorm_is_a_clear_error_or_replaced(quiet_trainer_kwargs):
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, callbacks=[DPSGD()], **quiet_trainer_kwargs)
    with pytest.raises(ValueError, match="replace_batchnorm=True"):
        trainer.fit(_model(norm="batch"), datamodule=DigitsDataModule(image_size=8))
    model = _model(norm="batch")
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, callbacks=[DPSGD(replace_batchnorm=True)], **quiet_trainer_kwargs)
    trainer.fit(model, datamodule=DigitsDataModule(image_size=8))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())


@pytest.mark.parametrize(
    "kwargs, match",
    [({"noise_multiplier": -1}, "noise_multiplier"), ({"max_grad_norm": 0}, "max_grad_norm"), ({"delta": 1.0}, "delta")],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPSGD(**kwargs)


def test_two_process_cpu_ddp(tmp_path):
    out = tmp_path / "result.pt"
    script = Path(__file__).with_name("ddp_dp_sgd_script.py")
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = torch.load(out, weights_only=True)
    assert 0 < result["epsilon"] < 100
    torch.testing.assert_close(result["weights"][0], result["weights"][1])  # ranks stay in sync


def test_secure_mode_refuses_a_seed_and_needs_torchcsprng(monkeypatch):
    with pytest.raises(ValueError, match=r"secure_mode=True\) takes no seed \(got seed=0\).*Drop seed"):
        DPSGD(secure_mode=True, seed=0)
    with pytest.raises(ValueError, match="secure_mode=True\\) needs poisson_sampling=True"):
        DPSGD(secure_mode=True, poisson_sampling=False)
    monkeypatch.setitem(sys.modules, "torchcsprng", None)  # not installed
    with pytest.raises(ImportError, match="secure_mode=True\\) needs the torchcsprng package"):
        DPSGD(secure_mode=True)


def test_secure_mode_draws_noise_and_batches_from_the_secure_generator(monkeypatch, quiet_trainer_kwargs):
    secure = torch.Generator()
    fake = types.SimpleNamespace(create_random_device_generator=lambda path: secure if path == "/dev/urandom" else None)
    monkeypatch.setitem(sys.modules, "torchcsprng", fake)
    dp = DPSGD(secure_mode=True)
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, callbacks=[dp], **quiet_trainer_kwargs)
    trainer.fit(_model(), datamodule=DigitsDataModule(image_size=8, batch_size=32))
    optimizer, loader = trainer.optimizers[0], trainer.train_dataloader
    assert optimizer.secure_mode and optimizer.generator is secure  # Opacus' floating-point-safe noise
    assert loader.batch_sampler.generator is secure and loader.generator is secure
    assert dp.seed is None and "generators" not in dp.state_dict() and dp.epsilon > 0


def test_default_seed_is_zero():
    assert DPSGD().seed == 0 and DPSGD(seed=None).seed == 0 and DPSGD(seed=3).seed == 3

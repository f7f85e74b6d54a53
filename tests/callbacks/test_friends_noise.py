from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_defense.callbacks import FriendsNoise, generate_friendly_noise
from tests.callbacks.ddp_training_defenses_script import Crash, RecordImages, run, tiny_digits, tiny_model, trainer_kwargs

ZETA = 16 / 255


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"begin_epoch": -1}, "begin_epoch must be an integer >= 0; got -1"),
        ({"zeta": 0.0}, r"zeta must be in \(0, 1\]"),
        ({"noise_type": "salt"}, "noise_type must be one of .*'bernoulli'.*got 'salt'"),
        ({"noise_eps": 2.0}, r"noise_eps must be in \(0, 1\]"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"init_eps": 0.5}, "init_eps must be in"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"noise_file": "/nonexistent/noise.safetensors"}, "noise_file '/nonexistent/noise.safetensors' does not exist"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        FriendsNoise(**kwargs)


def test_batch_without_indices_is_a_clear_error():
    trainer = SimpleNamespace(current_epoch=0, global_rank=0)
    with pytest.raises(ValueError, match="indices.*IndexedDataset"):
        FriendsNoise().on_train_batch_start(trainer, None, [torch.rand(2, 1, 4, 4), torch.zeros(2)], 0)


class ReadsEightPixels(nn.Module):
    """Oracle: 9 classes whose logits are ``10 * (x_j - 0.5)`` for the first 8 pixels, and 0."""

    def forward(self, x):
        return torch.cat([10 * (x.flatten(1)[:, :8] - 0.5), torch.zeros(len(x), 1)], dim=1)


def test_algorithm1_saturates_ignored_pixels_and_spares_used_ones():
    # The KL term cannot see pixels 8..63, so the size term pushes them to +-zeta; on the 8 pixels the
    # model reads, the KL curvature (10^2/81 > 2 * lam / 64) pulls eps back to 0.
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    x.view(8, -1)[:, :8] = 0.5
    kwargs = dict(zeta=ZETA, steps=30, lr=0.1, lam=16.0, loss_scale=1.0)
    eps = generate_friendly_noise(ReadsEightPixels(), x, torch.arange(8), **kwargs)
    assert eps.abs().max() <= ZETA + 1e-7
    flat = eps.flatten(1)
    ignored, used = flat[:, 8:].abs(), flat[:, :8].abs()
    assert (ignored > 0.99 * ZETA).float().mean() > 0.95
    assert used.mean() < 0.05 * ZETA
    # each sample's eps is independent of the batch it is optimised in (DDP splits batches differently)
    alone = generate_friendly_noise(ReadsEightPixels(), x[5:], torch.arange(5, 8), **kwargs)
    torch.testing.assert_close(alone, eps[5:], atol=1e-6, rtol=0)


def test_fit_adds_random_then_friendly_plus_random_noise(tmp_path):
    L.seed_everything(0)
    dm = tiny_digits()
    friends = FriendsNoise(begin_epoch=1, noise_type="bernoulli", noise_eps=4 / 255, steps=2, batch_size=64)
    recorder = RecordImages()
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, callbacks=[friends, recorder], **trainer_kwargs(tmp_path))
    trainer.fit(tiny_model(), datamodule=dm)
    friendly = friends.friendly_noise
    assert friendly is not None and friendly.shape == (180, 1, 8, 8)
    assert friendly.abs().max() <= ZETA + 1e-6 and friendly.abs().mean() > 1 / 255  # a real perturbation
    clean_images, _ = dm.train_tensors()
    mu = 4 / 255
    for epoch, seen, idx in recorder.batches:
        base = clean_images[idx] + (friendly[idx] if epoch >= 1 else 0)
        noise = seen - base
        inside = ((base + mu) < 1) & ((base - mu) > 0)  # pixels where clamping did not act
        assert inside.float().mean() > 0.2
        torch.testing.assert_close(noise[inside].abs(), torch.full_like(noise[inside], mu), atol=1e-5, rtol=0)
        assert seen.min() >= 0 and seen.max() <= 1
    # fresh noise at every iteration: two batches do not share one noise pattern
    signs = [torch.sign(seen - clean_images[idx] - (friendly[idx] if e else 0)) for e, seen, idx in recorder.batches]
    assert len(recorder.batches) == 4 and not torch.equal(signs[0], signs[1])


def test_save_load_and_zeta_mismatch(tmp_path):
    friends = FriendsNoise()
    friends._set_noise(torch.randint(-127, 128, (5, 1, 4, 4), dtype=torch.int8))
    path = tmp_path / "noise.safetensors"
    friends.save(path)
    loaded = FriendsNoise(noise_file=path)
    torch.testing.assert_close(loaded.friendly_noise, friends.friendly_noise)
    with pytest.raises(ValueError, match="generated with zeta=.*has zeta=0.1"):
        FriendsNoise(zeta=0.1, noise_file=path)
    with pytest.raises(RuntimeError, match="no friendly noise yet"):
        FriendsNoise().save(tmp_path / "x.safetensors")


def test_loaded_noise_is_used_instead_of_generating(tmp_path, monkeypatch):
    noise = torch.randint(-127, 128, (180, 1, 8, 8), dtype=torch.int8)
    source = FriendsNoise(begin_epoch=0)
    source._set_noise(noise)
    source.save(tmp_path / "transfer.safetensors")
    friends = FriendsNoise(begin_epoch=0, noise_type=None, noise_file=tmp_path / "transfer.safetensors")
    monkeypatch.setattr(FriendsNoise, "_generate", lambda *a: pytest.fail("must not regenerate"))
    recorder, dm = RecordImages(), tiny_digits()
    L.Trainer(max_epochs=1, limit_train_batches=1, callbacks=[friends, recorder], **trainer_kwargs(tmp_path)).fit(tiny_model(), datamodule=dm)
    _, seen, idx = recorder.batches[0]
    expected = (dm.train_tensors()[0][idx] + noise[idx].float() * (ZETA / 127)).clamp(0, 1)
    torch.testing.assert_close(seen, expected)


def test_crash_and_resume_keeps_the_noise(tmp_path, monkeypatch):
    ckpt_dir = tmp_path / "ckpt"
    L.seed_everything(0)
    friends = FriendsNoise(begin_epoch=1, steps=2, batch_size=64, save_file=tmp_path / "noise.safetensors")
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=-1, every_n_epochs=1)
    kwargs = trainer_kwargs(tmp_path, enable_checkpointing=True, max_epochs=3, limit_train_batches=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        L.Trainer(callbacks=[friends, checkpoint, Crash(epoch=2)], **kwargs).fit(tiny_model(), datamodule=tiny_digits())
    generated = friends._noise.clone()
    assert (tmp_path / "noise.safetensors").is_file()

    resumed = FriendsNoise(begin_epoch=1, steps=2, batch_size=64)
    monkeypatch.setattr(FriendsNoise, "_generate", lambda *a: pytest.fail("a resumed run must not regenerate"))
    recorder = RecordImages()
    trainer = L.Trainer(callbacks=[resumed, recorder], **{**kwargs, "enable_checkpointing": False})
    trainer.fit(tiny_model(), datamodule=tiny_digits(), ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert trainer.current_epoch == 3 and recorder.batches[0][0] == 2
    assert torch.equal(resumed._noise, generated)


def test_ddp_two_processes_generate_the_same_noise_as_one(tmp_path, training_defenses_ddp):
    run("friends", 1, tmp_path)
    noise_one, noise_two = torch.load(tmp_path / "friends.pt"), torch.load(training_defenses_ddp / "friends.pt")
    assert noise_one.dtype == torch.int8 and noise_one.shape == (180, 1, 8, 8)
    assert noise_one.float().abs().mean() > 5  # a real perturbation: on average over 5/127 of zeta
    assert torch.equal(noise_one, noise_two)

import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_defense.callbacks import FriendsNoise, generate_friendly_noise
from lightning_defense.core.store import ChunkCache, fingerprint
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
        ({"chunk_size": 0}, r"chunk_size must be an integer >= 1 \(samples per chunk file\); got 0"),
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
    # a checkpoint of this run points to the transferred file
    source = friends.state_dict()["friendly_noise_source"]
    assert source["kind"] == "file" and Path(source["path"]) == (tmp_path / "transfer.safetensors").resolve()


def test_noise_generated_with_one_architecture_defends_another(tmp_path, monkeypatch):
    """The paper's transfer result as a user runs it: save_file= from one fit, noise_file= in another."""
    from lightning_defense.models import ImageClassifier

    path = tmp_path / "small_cnn_width4.safetensors"
    source = FriendsNoise(begin_epoch=0, steps=3, batch_size=64, save_file=path)
    L.Trainer(max_epochs=1, limit_train_batches=1, callbacks=[source], **trainer_kwargs(tmp_path)).fit(
        tiny_model(), datamodule=tiny_digits())
    generated = source.friendly_noise
    assert path.is_file() and generated.abs().max() > 0.5 * ZETA  # real friendly noise, not the init

    monkeypatch.setattr(FriendsNoise, "_generate", lambda *a: pytest.fail("the transferred noise must not be regenerated"))
    target = FriendsNoise(begin_epoch=0, noise_type=None, noise_file=path)
    wider = ImageClassifier("small_cnn", num_classes=10, in_chans=1, lr=0.05, flip=False, crop_padding=1,
                            backbone_kwargs={"width": 8})  # another architecture
    recorder, dm = RecordImages(), tiny_digits()
    L.Trainer(max_epochs=1, limit_train_batches=2, callbacks=[target, recorder], **trainer_kwargs(tmp_path / "b")).fit(
        wider, datamodule=dm)
    for _, seen, idx in recorder.batches:
        torch.testing.assert_close(seen, (dm.train_tensors()[0][idx] + generated[idx]).clamp(0, 1))


def test_side_file_digest_and_missing_chunks_are_checked(tmp_path):
    noise = torch.randint(-127, 128, (5, 1, 2, 2), dtype=torch.int8)
    cache = ChunkCache(tmp_path / "friends-key", 5, (1, 2, 2), "int8", chunk_size=2)
    for i, (start, stop) in enumerate(cache.ranges):
        cache.write_chunk(i, noise[start:stop].numpy())
    cache.write_manifest()
    source = {"kind": "chunks", "path": str(cache.directory), "digest": fingerprint(noise), "num_samples": 5,
              "sample_shape": [1, 2, 2], "chunk_size": 2}
    friends = FriendsNoise()
    friends.load_state_dict({"friendly_noise_source": source, "zeta": ZETA})
    assert torch.equal(friends._noise, noise) and friends.state_dict()["friendly_noise_source"] == source
    with pytest.raises(ValueError, match="does not match the checkpoint's digest"):
        FriendsNoise().load_state_dict({"friendly_noise_source": {**source, "digest": fingerprint(noise + 1)}, "zeta": ZETA})
    cache.chunk_path(1).unlink()
    with pytest.raises(FileNotFoundError, match=r"friends-key'.*chunks \[1\].*Copy that directory back"):
        FriendsNoise().load_state_dict({"friendly_noise_source": source, "zeta": ZETA})


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
    # the checkpoint references the chunked side file under default_root_dir instead of embedding the tensor
    state = torch.load(ckpt_dir / "last.ckpt", weights_only=True)["callbacks"][friends.state_key]
    source = state["friendly_noise_source"]
    assert "friendly_noise" not in state and source["kind"] == "chunks"
    side_dir = Path(source["path"])
    assert side_dir.parent == tmp_path / "friendly_noise" and (side_dir / "manifest.json").is_file()

    resumed = FriendsNoise(begin_epoch=1, steps=2, batch_size=64)
    real_generate = FriendsNoise._generate
    monkeypatch.setattr(FriendsNoise, "_generate", lambda *a: pytest.fail("a resumed run must not regenerate"))
    recorder = RecordImages()
    resume_kwargs = {**kwargs, "enable_checkpointing": False}
    trainer = L.Trainer(callbacks=[resumed, recorder], **resume_kwargs)
    trainer.fit(tiny_model(), datamodule=tiny_digits(), ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert trainer.current_epoch == 3 and recorder.batches[0][0] == 2
    assert torch.equal(resumed._noise, generated)

    # side file gone: a clear error naming it, unless the user opts in to regenerating
    shutil.rmtree(side_dir)
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(side_dir))}.*missing.*regenerate_missing=True"):
        L.Trainer(callbacks=[FriendsNoise(begin_epoch=1, steps=2, batch_size=64)], **resume_kwargs).fit(
            tiny_model(), datamodule=tiny_digits(), ckpt_path=str(ckpt_dir / "last.ckpt"))
    calls = []
    monkeypatch.setattr(FriendsNoise, "_generate", lambda *a: calls.append(1) or real_generate(*a))
    regenerated = FriendsNoise(begin_epoch=1, steps=2, batch_size=64, regenerate_missing=True)
    with pytest.warns(UserWarning, match="regenerating"):
        L.Trainer(callbacks=[regenerated], **resume_kwargs).fit(
            tiny_model(), datamodule=tiny_digits(), ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert calls == [1] and regenerated._noise.shape == generated.shape


def test_generation_resumes_after_a_crash_mid_generation(tmp_path, monkeypatch):
    def fit(noise_dir):
        L.seed_everything(0)
        friends = FriendsNoise(begin_epoch=0, steps=2, batch_size=32, chunk_size=32, noise_dir=noise_dir)
        L.Trainer(max_epochs=1, limit_train_batches=1, callbacks=[friends], **trainer_kwargs(tmp_path)).fit(
            tiny_model(), datamodule=tiny_digits())
        return friends._noise

    uninterrupted = fit(tmp_path / "whole")
    real_range, calls = FriendsNoise._friendly_range, []

    def crash_after_two_chunks(self, *args):
        calls.append(args[2:])
        if len(calls) > 2:
            raise RuntimeError("killed mid-generation")
        return real_range(self, *args)

    monkeypatch.setattr(FriendsNoise, "_friendly_range", crash_after_two_chunks)
    with pytest.raises(RuntimeError, match="killed mid-generation"):
        fit(tmp_path / "crashed")
    (cache_dir,) = (tmp_path / "crashed").iterdir()
    assert sorted(p.name for p in cache_dir.iterdir()) == [  # no manifest, no temporary files
        "chunk_00000.npy", "chunk_00000.npy.sha256", "chunk_00001.npy", "chunk_00001.npy.sha256"]

    calls.clear()
    monkeypatch.setattr(FriendsNoise, "_friendly_range", lambda self, *args: calls.append(args[2:]) or real_range(self, *args))
    resumed = fit(tmp_path / "crashed")
    assert calls == [(64, 96), (96, 128), (128, 160), (160, 180)]  # only the chunks that were not written
    assert torch.equal(resumed, uninterrupted)
    assert (cache_dir / "manifest.json").is_file()


def test_cache_key_covers_what_determines_the_noise(tmp_path):
    L.seed_everything(0)
    model, images = tiny_model(), torch.rand(10, 1, 8, 8)

    def directory(model=model, images=images, **kwargs):
        return FriendsNoise(**kwargs).noise_cache(model, images, tmp_path).directory

    base = directory()
    assert directory() == base and directory(noise_type="gaussian", begin_epoch=3) == base  # training-side only
    changed = [directory(zeta=8 / 255, init_eps=4 / 255), directory(steps=21), directory(lr=10.0), directory(lam=2.0),
               directory(seed=1), directory(batch_size=64), directory(images=images.flip(0))]
    other = tiny_model()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3
    changed.append(directory(model=other))
    assert len({base, *changed}) == len(changed) + 1


def test_old_checkpoints_with_the_embedded_tensor_still_load():
    noise = torch.randint(-127, 128, (5, 1, 4, 4), dtype=torch.int8)
    friends = FriendsNoise()
    friends.load_state_dict({"friendly_noise": noise, "zeta": ZETA})
    assert torch.equal(friends._noise, noise)
    assert torch.equal(friends.state_dict()["friendly_noise"], noise)  # no side file to point to: kept embedded


def test_ddp_two_processes_generate_the_same_noise_as_one(tmp_path, training_defenses_ddp):
    run("friends", 1, tmp_path)
    (noise_one,), per_rank = torch.load(tmp_path / "friends.pt"), torch.load(training_defenses_ddp / "friends.pt")
    assert noise_one.dtype == torch.int8 and noise_one.shape == (180, 1, 8, 8)
    assert noise_one.float().abs().mean() > 5  # a real perturbation: on average over 5/127 of zeta
    assert per_rank.shape == (2, 180, 1, 8, 8)  # each rank computed some of the 3 chunks, and holds them all
    assert torch.equal(per_rank[0], noise_one) and torch.equal(per_rank[1], noise_one)
    # generated after an epoch of training, when BatchNorm statistics differ per rank: still one tensor
    late = torch.load(training_defenses_ddp / "friends_late.pt")
    assert late.shape == (2, 180, 1, 8, 8) and torch.equal(late[0], late[1]) and late.float().abs().mean() > 1

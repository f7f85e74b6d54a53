"""Issues #15.2 and #15.7: stored files that are damaged, swapped, unreadable or shared.

* A FRIENDS chunk cache with a flipped or truncated chunk is never reused: a fresh fit recomputes that
  chunk (the warning names the file) and trains on the undamaged run's friendly noise.
* A purification cache whose chunk files were swapped (with their ``.sha256`` sidecars) is caught by the
  manifest's digests and recomputed, never used.
* A corrupt or truncated ``.safetensors`` weight or noise file is an error naming the file.
* Two jobs filling the same cache at once compute each chunk once: the second waits for the first's lock.
"""

import multiprocessing
import os
import re
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lightning_defense.callbacks import FriendsNoise, LinearProbe, PretrainedInit
from lightning_defense.callbacks.pretrained_init import load_state_dict_file
from lightning_defense.core.store import ChunkCache, CorruptStoreError, fill_cache
from lightning_defense.datamodules import DigitsDataModule
from lightning_defense.datamodules.diffusion_purified import DiffusionPurifiedDataModule
from lightning_defense.models import ImageClassifier
from tests.diffusion._tiny import save_tiny_ddpm


def _digits():
    return DigitsDataModule(image_size=8, val_fraction=0.05, test_fraction=0.85, batch_size=32, seed=0)  # 180 samples


def _model():
    return ImageClassifier("small_cnn", num_classes=10, in_chans=1, lr=0.05, crop_padding=0, flip=False,
                           backbone_kwargs={"width": 4})


def _fit(tmp_path, callbacks):
    L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False,
              enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
              default_root_dir=str(tmp_path), callbacks=callbacks).fit(_model(), datamodule=_digits())


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-16] + bytes(b ^ 0xFF for b in data[-16:]) if how == "flip" else data[: len(data) // 2])


# ------------------------------------------------------------------------------------------- FRIENDS
@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_friends_cache_with_a_damaged_chunk_is_recomputed_not_reused(tmp_path, monkeypatch, how):
    def friendly_noise(noise_dir):
        L.seed_everything(0)
        friends = FriendsNoise(begin_epoch=0, steps=2, batch_size=32, chunk_size=64, noise_dir=noise_dir)
        _fit(tmp_path, [friends])
        return friends

    reference = friendly_noise(tmp_path / "reference").friendly_noise
    first = friendly_noise(tmp_path / "damaged")
    cache_dir = Path(first._source["path"])
    _damage(cache_dir / "chunk_00001.npy", how)

    real, calls = FriendsNoise._friendly_range, []
    monkeypatch.setattr(FriendsNoise, "_friendly_range",
                        lambda self, *args: calls.append(args[2:]) or real(self, *args))
    with pytest.warns(UserWarning, match=re.escape(str(cache_dir)) + r".*chunk_00001\.npy.*do not match their SHA-256"):
        second = friendly_noise(tmp_path / "damaged")
    assert calls == [(64, 128)]  # that chunk alone, computed again
    assert Path(second._source["path"]) == cache_dir
    assert torch.equal(second.friendly_noise, reference)


# ------------------------------------------------------------------------------------ purification
@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    return save_tiny_ddpm(tmp_path_factory.mktemp("ddpm") / "tiny")


def _purified(ddpm_dir, cache_dir):
    return DiffusionPurifiedDataModule(_digits(), ddpm_dir, sigma=0.25, seed=0, batch_size=64, chunk_size=64,
                                       cache_dir=str(cache_dir), progress=False)


def test_purification_chunks_swapped_with_their_sidecars_are_caught_by_the_manifest(ddpm_dir, tmp_path, monkeypatch):
    first = _purified(ddpm_dir, tmp_path)
    first.setup("fit")
    reference = first.train_tensors()[0]
    cache = first.cache
    files = {p.name: p.read_bytes() for p in cache.directory.glob("chunk_*")}
    for a, b in (("chunk_00000.npy", "chunk_00001.npy"), ("chunk_00000.npy.sha256", "chunk_00001.npy.sha256")):
        (cache.directory / a).write_bytes(files[b])
        (cache.directory / b).write_bytes(files[a])
    assert cache.damaged() == [0, 1]  # each chunk matches its own sidecar; the manifest's digests catch the swap
    with pytest.raises(CorruptStoreError, match=r"chunk_00000\.npy does not match the SHA-256 in .*manifest\.json"):
        cache.load()

    real, recomputed = DiffusionPurifiedDataModule.purify_range, []

    def record(self, model, images, start, stop, *args):
        recomputed.append(start)
        return real(self, model, images, start, stop, *args)

    monkeypatch.setattr(DiffusionPurifiedDataModule, "purify_range", record)
    second = _purified(ddpm_dir, tmp_path)
    with pytest.warns(UserWarning, match=r"chunk_00000\.npy', 'chunk_00001\.npy'\] do not match their SHA-256"):
        second.setup("fit")
    assert recomputed == [0, 64]
    assert torch.equal(second.train_tensors()[0], reference)
    assert {p.name: p.read_bytes() for p in cache.directory.glob("chunk_*")} == files


# ---------------------------------------------------------------------------------- safetensors files
def _corrupt(path: Path, how: str) -> None:
    if how == "header":
        path.write_bytes(b"\xff\xff" + path.read_bytes()[2:])  # the header's length
    elif how == "truncate":
        _damage(path, "truncate")
    else:
        path.write_bytes(b"\xff" * 64)


@pytest.mark.parametrize("how", ["header", "truncate", "garbage"])
def test_corrupt_weight_files_are_errors_naming_the_file(tmp_path, how):
    path = tmp_path / "extractor.safetensors"
    save_file({k: v.contiguous() for k, v in _model().backbone.state_dict().items()}, str(path))
    _corrupt(path, how)
    message = rf"weight file {re.escape(repr(str(path)))} cannot be read as safetensors .*truncated or damaged.*again"
    with pytest.raises(CorruptStoreError, match=message):
        load_state_dict_file(path)
    with pytest.raises(CorruptStoreError, match=message):
        _fit(tmp_path, [PretrainedInit(checkpoint_path=path)])
    with pytest.raises(CorruptStoreError, match=message):
        _fit(tmp_path, [LinearProbe(checkpoint_path=path)])


@pytest.mark.parametrize("how", ["header", "truncate", "garbage"])
def test_a_corrupt_friendly_noise_file_is_an_error_naming_the_file(tmp_path, how):
    path = tmp_path / "noise.safetensors"
    friends = FriendsNoise()
    friends._set_noise(torch.randint(-127, 128, (8, 1, 8, 8), dtype=torch.int8))
    friends.save(path)
    FriendsNoise(noise_file=path)  # intact: reads back
    _corrupt(path, how)
    with pytest.raises(CorruptStoreError, match=rf"friendly noise file {re.escape(repr(str(path)))} cannot be read as "
                                                r"safetensors .*truncated or damaged.*FriendsNoise\.save\(\)"):
        FriendsNoise(noise_file=path)


# ----------------------------------------------------------------------------- two jobs, one cache
NUM_SAMPLES, CHUNK = 10, 3  # 4 chunks


def _expected() -> np.ndarray:
    return np.arange(2 * NUM_SAMPLES, dtype=np.uint8).reshape(NUM_SAMPLES, 2)


def _fill_job(directory: str, log: str, out: str, start) -> None:
    """One job: fill the shared cache (each chunk takes a while), then load it, verified, into ``out``."""
    cache = ChunkCache(directory, NUM_SAMPLES, (2,), "uint8", chunk_size=CHUNK)

    def compute(begin: int, stop: int) -> np.ndarray:
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()} {begin}\n")
        time.sleep(0.3)
        return _expected()[begin:stop]

    start.wait()  # both jobs reach the cache together
    fill_cache(cache, compute, progress=False)
    np.save(out, cache.load().raw())


def test_two_jobs_on_one_cache_compute_each_chunk_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    directory, log = tmp_path / "cache", tmp_path / "computed.log"
    jobs = [context.Process(target=_fill_job, args=(str(directory), str(log), str(tmp_path / f"out{i}.npy"), start))
            for i in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=300)
    assert [job.exitcode for job in jobs] == [0, 0]
    computed = [line.split() for line in log.read_text().splitlines()]
    assert sorted(int(begin) for _, begin in computed) == [0, 3, 6, 9]  # once per chunk, in total
    assert len({pid for pid, _ in computed}) == 1  # by the job that held the lock; the other waited
    for i in range(2):
        assert np.array_equal(np.load(tmp_path / f"out{i}.npy"), _expected())
    assert ChunkCache(directory, NUM_SAMPLES, (2,), "uint8", chunk_size=CHUNK).damaged() == []
    assert not (directory / ".lock").exists()  # released and removed

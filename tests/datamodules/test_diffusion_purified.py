import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_defense.datamodules import DigitsDataModule, GaussianNoiseDataModule
from lightning_defense.datamodules import diffusion_purified
from lightning_defense.datamodules.diffusion_purified import DiffusionPurifiedDataModule
from lightning_defense.diffusion import load_denoiser, noise_and_denoise, timestep_for_sigma
from tests.diffusion._tiny import save_tiny_ddpm

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    return save_tiny_ddpm(tmp_path_factory.mktemp("ddpm") / "tiny")


def small_digits(**kwargs):
    """180 training images of 8x8 (the test split takes 85%): 3 chunks of 64."""
    return DigitsDataModule(**{"image_size": 8, "val_fraction": 0.05, "test_fraction": 0.85, **kwargs})


def purified(ddpm_dir, cache_dir, base=None, **kwargs):
    kwargs = {"sigma": 0.25, "seed": 0, "batch_size": 64, "chunk_size": 64, "progress": False, **kwargs}
    return DiffusionPurifiedDataModule(base or small_digits(), ddpm_dir, cache_dir=str(cache_dir), **kwargs)


def chunk_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).glob("chunk_*.npy"))}


def test_training_split_is_purified_once_and_val_test_pass_through(ddpm_dir, tmp_path):
    clean = small_digits()
    clean.setup()
    dm = purified(ddpm_dir, tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    cache = dm.cache
    assert cache.is_complete() and len(list(cache.directory.glob("chunk_*.npy"))) == 3  # 180 images / 64
    images, labels = dm.train_tensors()
    assert images.shape == clean.train_set.images.shape and torch.equal(labels, clean.train_set.labels)
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(images * 255, (images * 255).round())  # stored as uint8
    assert (images - clean.train_set.images).abs().mean() > 0.05  # the tiny random UNet changes them
    assert dm.val_set is clean.val_set or torch.equal(dm.val_set.images, clean.val_set.images)
    assert torch.equal(dm.test_set.images, clean.test_set.images)
    x, y, idx = next(iter(dm.train_dataloader()))
    assert torch.equal(x, images[idx]) and torch.equal(y, labels[idx])
    # each stored image is NOISEANDDENOISE of that sample with its own (seed, index) noise
    denoiser = load_denoiser(ddpm_dir)
    t_star = timestep_for_sigma(denoiser.alphas_cumprod, 0.25)
    pick = torch.tensor([3, 100, 179])
    with torch.inference_mode():
        direct = noise_and_denoise(denoiser, clean.train_set.images[pick], pick, denoiser.alphas_cumprod, t_star, 0.25, 0)
    assert (direct - images[pick]).abs().max() <= 1 / 255 + 1e-6
    assert cache.meta["t_star"] == t_star and np.load(cache.chunk_path(0), mmap_mode="r").dtype == np.uint8


def test_finished_cache_is_reused_without_recomputing(ddpm_dir, tmp_path, monkeypatch):
    first = purified(ddpm_dir, tmp_path)
    first.setup("fit")
    before = chunk_bytes(first.cache.directory)
    monkeypatch.setattr(DiffusionPurifiedDataModule, "purify_range", lambda *a, **k: pytest.fail("recomputed"))
    second = purified(ddpm_dir, tmp_path)
    second.prepare_data()
    second.setup("fit")
    assert second.cache.directory == first.cache.directory
    assert chunk_bytes(second.cache.directory) == before


def test_cache_key_changes_with_every_input(ddpm_dir, tmp_path, monkeypatch):
    other_ddpm = save_tiny_ddpm(tmp_path / "other", seed=1)  # same architecture, other weights
    key = lambda **kw: purified(kw.pop("ddpm", ddpm_dir), tmp_path, **kw).cache_for().directory  # noqa: E731
    reference = key()
    variants = {
        "sigma": key(sigma=0.5),
        "seed": key(seed=1),
        "steps": key(steps=2),
        "weights": key(ddpm=other_ddpm),
        "data": key(base=small_digits(seed=1)),
        "storage": key(storage="float16"),
    }
    monkeypatch.setattr(diffusion_purified, "CODE_VERSION", "changed")
    variants["code version"] = key()
    assert all(v != reference for v in variants.values()), variants
    assert len(set(variants.values())) == len(variants)
    monkeypatch.undo()
    assert key() == reference  # and it is stable


def test_interrupted_run_resumes_from_the_finished_chunks(ddpm_dir, tmp_path, monkeypatch):
    real = DiffusionPurifiedDataModule.purify_range
    calls = []

    def crash_after_first_chunk(self, model, images, start, stop, *args):
        if calls:
            raise KeyboardInterrupt("simulated crash")
        calls.append(start)
        return real(self, model, images, start, stop, *args)

    monkeypatch.setattr(DiffusionPurifiedDataModule, "purify_range", crash_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        purified(ddpm_dir, tmp_path / "crashed").setup("fit")
    crashed_dir = next((tmp_path / "crashed").iterdir())
    assert sorted(p.name for p in crashed_dir.iterdir()) == ["chunk_00000.npy", "chunk_00000.npy.sha256"]  # no manifest, no temp files
    first_chunk = (crashed_dir / "chunk_00000.npy").read_bytes()

    resumed = []

    def record(self, model, images, start, stop, *args):
        resumed.append(start)
        return real(self, model, images, start, stop, *args)

    monkeypatch.setattr(DiffusionPurifiedDataModule, "purify_range", record)
    dm = purified(ddpm_dir, tmp_path / "crashed")
    dm.setup("fit")
    assert resumed == [64, 128]  # chunk 0 was not recomputed
    assert (crashed_dir / "chunk_00000.npy").read_bytes() == first_chunk
    monkeypatch.undo()
    fresh = purified(ddpm_dir, tmp_path / "fresh")
    fresh.setup("fit")
    assert chunk_bytes(fresh.cache.directory) == chunk_bytes(crashed_dir)


def test_bad_inputs_are_clear_errors(ddpm_dir, tmp_path):
    with pytest.raises(ValueError, match=r"sigma=10.0 is out of reach.*largest pixel-space sigma"):
        purified(ddpm_dir, tmp_path, sigma=10.0).setup("fit")
    noisy = GaussianNoiseDataModule(small_digits(), sigma=0.5)
    with pytest.raises(ValueError, match=r"DiffusionPurifiedDataModule: got GaussianNoiseDataModule training set values "
                                         r"in \[-.*outside \[0, 1\] pixels.*never clamps"):
        purified(ddpm_dir, tmp_path, base=noisy).setup("fit")
    with pytest.raises(ValueError, match="takes 1-channel images; the training images have 3 channels"):
        purified(ddpm_dir, tmp_path, base=small_digits(num_channels=3)).setup("fit")
    with pytest.raises(ValueError, match="trained on 8x8 images; the training images are 16x16"):
        purified(ddpm_dir, tmp_path, base=small_digits(image_size=16)).setup("fit")
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        purified(str(tmp_path / "nowhere"), tmp_path).setup("fit")
    with pytest.raises(ValueError, match="exactly one of sigma and timestep"):
        purified(ddpm_dir, tmp_path, timestep=10)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        purified(ddpm_dir, tmp_path, sigma=-0.1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        purified(ddpm_dir, tmp_path, steps=0)
    with pytest.raises(ValueError, match="storage must be one of"):
        purified(ddpm_dir, tmp_path, storage="int8")
    with pytest.raises(ValueError, match=r"steps must be at most t\*\+1"):
        purified(ddpm_dir, tmp_path, sigma=None, timestep=3, steps=5).setup("fit")


def test_fixed_timestep_and_multi_step_reverse(ddpm_dir, tmp_path):
    dm = purified(ddpm_dir, tmp_path, sigma=None, timestep=10, steps=3)
    dm.setup("fit")
    assert dm.cache.meta["t_star"] == 10 and dm.cache.meta["steps"] == 3
    assert dm.cache.meta["sigma"] == pytest.approx(
        float(((1 - dm.get_denoiser().alphas_cumprod[10]) / dm.get_denoiser().alphas_cumprod[10]).sqrt()) / 2
    )


def test_one_and_two_process_purification_give_identical_bytes(ddpm_dir, tmp_path):
    one = purified(ddpm_dir, tmp_path / "one")
    one.setup("fit")
    cmd = [
        sys.executable, "-m", "lightning_defense.cli", "fit", "--config", str(ROOT / "configs/digits/diffusion_denoise.yaml"),
        f"--data.init_args.denoiser={ddpm_dir}", f"--data.init_args.cache_dir={tmp_path / 'two'}",
        "--data.init_args.base.init_args.image_size=8", "--data.init_args.base.init_args.val_fraction=0.05",
        "--data.init_args.base.init_args.test_fraction=0.85", "--data.init_args.batch_size=64",
        "--data.init_args.chunk_size=64", "--data.init_args.progress=false",
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false", "--trainer.deterministic=false", "--test_after_fit=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                          text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output
    two_dir = tmp_path / "two" / one.cache.directory.name
    assert (two_dir / "manifest.json").is_file()
    assert chunk_bytes(two_dir) == chunk_bytes(one.cache.directory) and len(chunk_bytes(two_dir)) == 3


def test_purify_command_prints_the_cache(ddpm_dir, tmp_path, capsys):
    from lightning_defense.cli import main

    main([
        "purify", "--config", str(ROOT / "configs/digits/diffusion_denoise.yaml"),
        f"--data.init_args.denoiser={ddpm_dir}", f"--data.init_args.cache_dir={tmp_path}",
        "--data.init_args.base.init_args.image_size=8", "--data.init_args.base.init_args.val_fraction=0.05",
        "--data.init_args.base.init_args.test_fraction=0.85", "--data.init_args.progress=false",
    ])
    printed = capsys.readouterr().out
    directory = Path(printed.split("purified training set: ")[1].strip())
    assert (directory / "manifest.json").is_file() and directory.parent == tmp_path


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_chunk_of_a_finished_cache_is_recomputed_never_used(ddpm_dir, tmp_path, monkeypatch, damage):
    reference = purified(ddpm_dir, tmp_path / "reference")
    reference.setup("fit")
    first = purified(ddpm_dir, tmp_path / "damaged")
    first.setup("fit")
    chunk = first.cache.chunk_path(1)
    data = chunk.read_bytes()
    chunk.write_bytes(data[:-16] + bytes(b ^ 0xFF for b in data[-16:]) if damage == "flip" else data[: len(data) // 2])

    real = DiffusionPurifiedDataModule.purify_range
    recomputed = []

    def record(self, model, images, start, stop, *args):
        recomputed.append(start)
        return real(self, model, images, start, stop, *args)

    monkeypatch.setattr(DiffusionPurifiedDataModule, "purify_range", record)
    second = purified(ddpm_dir, tmp_path / "damaged")
    with pytest.warns(Warning, match="chunk_00001.npy"):
        second.setup("fit")
    assert recomputed == [64]  # only the damaged chunk, and before any image of it reached the training set
    assert torch.equal(second.train_tensors()[0], reference.train_tensors()[0])
    assert chunk_bytes(second.cache.directory) == chunk_bytes(reference.cache.directory)


def test_purify_command_under_torchrun_shares_the_work_and_matches_one_process(ddpm_dir, tmp_path):
    one = purified(ddpm_dir, tmp_path / "one", steps=2)
    one.setup("fit")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "lightning_defense.cli", "purify",
        "--config", str(ROOT / "configs/digits/diffusion_denoise.yaml"),
        f"--data.init_args.denoiser={ddpm_dir}", f"--data.init_args.cache_dir={tmp_path / 'two'}",
        "--data.init_args.base.init_args.image_size=8", "--data.init_args.base.init_args.val_fraction=0.05",
        "--data.init_args.base.init_args.test_fraction=0.85", "--data.init_args.batch_size=64",
        "--data.init_args.chunk_size=64", "--data.init_args.steps=2", "--data.init_args.progress=false",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert output.count("purified training set: ") == 1  # printed by rank 0 only
    two_dir = tmp_path / "two" / one.cache.directory.name
    assert chunk_bytes(two_dir) == chunk_bytes(one.cache.directory) and len(chunk_bytes(two_dir)) == 3


def test_sigma_below_the_first_noise_level_warns_that_the_data_comes_back_nearly_unchanged(ddpm_dir, tmp_path):
    dm = purified(ddpm_dir, tmp_path, sigma=1e-9)
    with pytest.warns(UserWarning, match=r"sigma=1e-09 is at or below the schedule's first noise level.*t\*=0.*nearly "
                                         "unchanged"):
        dm.setup("fit")
    assert dm.cache.meta["t_star"] == 0
    with pytest.warns(UserWarning, match="t\\*=0"):
        purified(ddpm_dir, tmp_path, sigma=None, timestep=0).setup("fit")


def test_certified_sigma_is_sigma_or_the_pixel_sigma_of_the_fixed_timestep(ddpm_dir, tmp_path):
    assert purified(ddpm_dir, tmp_path, sigma=0.3).certified_sigma == 0.3
    fixed = purified(ddpm_dir, tmp_path, sigma=None, timestep=10)
    abar = load_denoiser(ddpm_dir).alphas_cumprod[10].double()
    assert fixed.certified_sigma == pytest.approx(float(((1 - abar) / abar).sqrt()) / 2, rel=1e-12)
    fixed.setup("fit")
    assert fixed.cache.meta["sigma"] == fixed.certified_sigma  # the noise the purification really added


def test_bf16_precision_is_its_own_cache_and_stays_float32_off_the_gpu(ddpm_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    full = DiffusionPurifiedDataModule(small_digits(), ddpm_dir, sigma=0.25, cache_dir=str(tmp_path), progress=False)
    half = DiffusionPurifiedDataModule(small_digits(), ddpm_dir, sigma=0.25, cache_dir=str(tmp_path), progress=False,
                                       precision="bf16")
    assert full.cache_for().meta["key"] != half.cache_for().meta["key"]
    full.prepare_data()
    with pytest.warns(UserWarning, match="runs in float32 on cpu"):
        half.prepare_data()
    assert np.array_equal(full.cache.load().raw(), half.cache.load().raw())
    with pytest.raises(ValueError, match="precision"):
        DiffusionPurifiedDataModule(small_digits(), ddpm_dir, precision="fp8")

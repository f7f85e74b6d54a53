import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lightning_defense.core.batch import IndexedDataset
from lightning_defense.core.store import fingerprint
from lightning_defense.datamodules import CIFAR10DataModule, DigitsDataModule
from lightning_defense.datamodules.base import seeded_split
from lightning_defense.datamodules.cifar10 import TEST_BATCH, TRAIN_BATCHES
from lightning_defense.datamodules.diffusion_purified import DiffusionPurifiedDataModule
from lightning_defense.datamodules.eclipse import EclipseDataModule, compensate, replicate
from lightning_defense.diffusion import noise_and_denoise
from lightning_defense.diffusion.denoiser import Denoiser
from lightning_defense.diffusion.sparse import SparseDenoiserBuilder
from lightning_defense.models import ImageClassifier
from tests.datamodules.test_cifar10 import make_archive

ROOT = Path(__file__).resolve().parents[2]


def small_digits(channels=3, **kwargs):
    """~108 training and 90 validation images of 8x8 (the test split takes 85%)."""
    return DigitsDataModule(
        **{"image_size": 8, "num_channels": channels, "val_fraction": 0.05, "test_fraction": 0.85, "batch_size": 32, **kwargs}
    )


def eclipse(tmp_dir, base=None, **kwargs):
    settings = dict(
        clean_fraction=0.1, replication=4, t_star=3, num_train_timesteps=100, block_out_channels=(16, 32),
        layers_per_block=1, attention_resolutions=(4,), num_heads=2, train_steps=3, train_batch_size=16,
        model_dir=str(tmp_dir / "models"), cache_dir=str(tmp_dir / "purified"), batch_size=64, chunk_size=64,
        progress=False, device="cpu",
    )
    settings.update(kwargs)
    return EclipseDataModule(base or small_digits(), **settings)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One trained + purified ECLIPSE setup shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("eclipse")
    dm = eclipse(tmp)
    dm.prepare_data()
    dm.setup("fit")
    return tmp, dm


def test_sparse_set_comes_from_the_validation_split_and_is_replicated(shared):
    _, dm = shared
    clean = small_digits()
    clean.setup("fit")
    n_train, val = len(clean.train_set), clean.val_set.images
    sparse = dm.sparse_set()
    assert len(sparse) == round(0.1 * n_train) > 0
    # every D_s image is a validation image (never a test one)
    for image in sparse:
        assert ((val - image).flatten(1).abs().amax(1) == 0).any()
    augmented = dm.augmented_set()
    assert len(augmented) == 5 * len(sparse)  # (M + 1) |D_s|, Algorithm 1 lines 1-4
    for copy in augmented.split(len(sparse)):
        assert torch.equal(copy, sparse)
    assert len(replicate(sparse, 0)) == len(sparse)
    # user indices into the validation split, and a clean datamodule
    assert torch.equal(eclipse(shared[0], clean_subset=[0, 5, 7]).sparse_set(), val[[0, 5, 7]])
    other = small_digits(val_fraction=0.1)  # its training split shares no image with base's test split
    other.setup("fit")
    assert torch.equal(eclipse(shared[0], clean_subset=other).sparse_set(), other.train_set.images)


def test_diffusion_model_is_improved_ddpm_with_learned_variance(shared):
    _, dm = shared
    denoiser = dm.get_denoiser()
    assert denoiser.variance_type == "learned_range" and denoiser.unet.config.out_channels == 6
    assert denoiser.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert len(denoiser.alphas_cumprod) == 100
    assert tuple(denoiser.unet.config.down_block_types) == ("DownBlock2D", "AttnDownBlock2D")  # attention at 4x4
    # the noise level is the paper's abar(t*) (0-based t* - 1), i.e. sqrt(1 - abar) in model space
    assert dm.cache.meta["t_star"] == 2 and dm.cache.meta["steps"] == 3


def test_reverse_process_runs_t_star_steps_from_t_star_down_to_zero(shared, tmp_path, monkeypatch):
    dm = eclipse(tmp_path, t_star=4, model_dir=str(shared[0] / "models"))  # the shared model: t* is not in its key
    dm.get_denoiser()  # load first: only purification calls are counted
    seen = []
    original = Denoiser.forward

    def counting(self, x_t, t):
        seen.append(int(t[0]))
        return original(self, x_t, t)

    monkeypatch.setattr(Denoiser, "forward", counting)
    dm.setup("fit")
    batches = -(-len(dm.train_set) // 64)
    assert seen == [3, 2, 1, 0] * batches


def test_purified_image_i_is_training_sample_i(shared, tmp_path):
    # t* = 1 adds noise of std sqrt(1 - abar_0) ~ 0.016 and takes one step: any model gives back (nearly) x
    base = small_digits()
    dm = eclipse(tmp_path, base=base, t_star=1, model_dir=str(shared[0] / "models"))
    dm.prepare_data()
    dm.setup("fit")
    originals = base.train_set.images
    purified, labels = dm.train_tensors()
    assert torch.equal(labels, base.train_set.labels)
    distances = torch.cdist(purified.flatten(1), originals.flatten(1))
    assert torch.equal(distances.argmin(1), torch.arange(len(originals)))
    assert (purified - originals).abs().max() < 0.1
    x, y, idx = next(iter(dm.train_dataloader()))  # shuffled loader keeps (image, label, index) together
    assert torch.equal(x, purified[idx]) and torch.equal(y, base.train_set.labels[idx])


def test_cached_images_are_the_reverse_process_of_each_sample(shared):
    _, dm = shared
    clean = small_digits()
    clean.setup("fit")
    purified, _ = dm.train_tensors()
    denoiser = dm.get_denoiser()
    pick = torch.tensor([0, 41, len(purified) - 1])
    with torch.inference_mode():
        direct = noise_and_denoise(
            denoiser, clean.train_set.images[pick], pick, denoiser.alphas_cumprod, 2, dm.cache.meta["sigma"],
            dm.seed, 3, "learned_range",
        )
    assert (direct - purified[pick]).abs().max() <= 1 / 255 + 1e-6
    assert (purified - clean.train_set.images).abs().mean() > 0.02  # the 3-step tiny model changes them


def test_model_and_purification_caches_are_reused(shared, monkeypatch):
    tmp, first = shared
    monkeypatch.setattr(SparseDenoiserBuilder, "train", lambda *a, **k: pytest.fail("retrained"))
    monkeypatch.setattr(DiffusionPurifiedDataModule, "purify_range", lambda *a, **k: pytest.fail("re-purified"))
    second = eclipse(tmp)
    second.prepare_data()
    second.setup("fit")
    assert second.cache.directory == first.cache.directory
    assert torch.equal(second.train_tensors()[0], first.train_tensors()[0])
    models = lambda **kw: eclipse(tmp, **kw).builder.key(eclipse(tmp, **kw).augmented_set())  # noqa: E731
    reference = models()
    for change in ({"replication": 2}, {"train_steps": 4}, {"seed": 1}, {"num_train_timesteps": 200}, {"lr": 1e-3}):
        assert models(**change) != reference, change


def test_compensation_statistics_over_many_draws():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4000, 3, 4, 4, generator=generator) * 0.6 + 0.2  # colourful, away from the clamp
    gray_only = compensate(images, grayscale_p=0.4, noise_std=0.0, generator=generator)
    is_gray = (gray_only.amax(1) - gray_only.amin(1)).flatten(1).amax(1) < 1e-6
    assert abs(is_gray.float().mean().item() - 0.4) < 0.03
    luma = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert torch.allclose(gray_only[is_gray], luma[is_gray].expand(-1, 3, -1, -1), atol=1e-6)
    assert torch.equal(gray_only[~is_gray], images[~is_gray])
    noise_only = compensate(images, grayscale_p=0.0, noise_std=0.05, generator=generator)
    residual = noise_only - images
    assert abs(residual.std().item() - 0.05) < 0.002 and abs(residual.mean().item()) < 0.002
    extremes = compensate(torch.ones(500, 3, 4, 4).bernoulli_(0.5), 0.4, 0.05, generator)
    assert extremes.min() == 0 and extremes.max() == 1  # clamped at both ends
    assert ((extremes > 0) & (extremes < 1)).float().mean() > 0.3  # noise moved them inside, clamp kept them there
    one_channel = torch.rand(100, 1, 4, 4, generator=generator)
    assert torch.equal(compensate(one_channel, grayscale_p=1.0, noise_std=0.0, generator=generator), one_channel)


class RecordBatches(L.Callback):
    def __init__(self):
        self.train, self.val = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.train.append((trainer.current_epoch, batch[0].clone(), batch[2].clone()))

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self.val.append((batch[0].clone(), batch[2].clone()))


def fit_and_record(dm, epochs=2):
    record = RecordBatches()
    model = ImageClassifier("small_cnn", num_classes=10, in_chans=3, crop_padding=0, flip=False)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, callbacks=[record], num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    return record


def test_compensation_is_fresh_every_epoch_reproducible_and_training_only(shared):
    tmp, dm = shared
    purified, _ = dm.train_tensors()
    record = fit_and_record(eclipse(tmp, grayscale_p=0.4, noise_std=0.05))
    by_epoch = {}
    for epoch, images, indices in record.train:
        by_epoch.setdefault(epoch, {}).update({int(i): x for i, x in zip(indices, images)})
    assert set(by_epoch) == {0, 1} and len(by_epoch[0]) == len(purified)
    first = torch.stack([by_epoch[0][i] for i in range(len(purified))])
    second = torch.stack([by_epoch[1][i] for i in range(len(purified))])
    assert (first - second).abs().mean() > 0.02  # a fresh draw in each epoch
    colour_free = purified.amax(1, keepdim=True) - purified.amin(1, keepdim=True) < 1e-6
    residual = (first - purified)[((first > 0) & (first < 1)) & ~colour_free.expand_as(first)]
    assert 0.04 < residual.std().item() < 0.1  # noise 0.05 (plus grayscale shifts on 40% of images)
    # validation batches pass through untouched
    for images, indices in record.val:
        assert torch.equal(images, dm.val_set.images[indices])
    # the same seed gives the same compensated batches
    again = fit_and_record(eclipse(tmp, grayscale_p=0.4, noise_std=0.05))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(record.train, again.train))


def test_fit_compensation_is_the_published_stream_through_train_batch_transform(shared):
    """Every fit batch is train_batch_transform of the purified batch, drawn from the published generator."""
    tmp, dm = shared
    purified, _ = dm.train_tensors()
    record = fit_and_record(eclipse(tmp, grayscale_p=0.4, noise_std=0.05), epochs=1)
    for step, (epoch, images, indices) in enumerate(record.train):
        key = fingerprint("eclipse-compensation", 0, epoch, step, 0, 0)
        published = torch.Generator().manual_seed(int(key[:15], 16))
        assert torch.equal(images, compensate(purified[indices], 0.4, 0.05, published))


def test_certified_sigma_is_the_pixel_sigma_of_the_t_star_noise_level(shared, tmp_path, monkeypatch):
    _, dm = shared
    abar = dm.get_denoiser().alphas_cumprod[dm.t_star - 1].double()
    assert dm.certified_sigma == pytest.approx(float(((1 - abar) / abar).sqrt()) / 2, rel=1e-9)
    assert dm.certified_sigma == pytest.approx(dm.cache.meta["sigma"], rel=1e-9)  # what the purification added
    monkeypatch.setattr(SparseDenoiserBuilder, "train", lambda *a, **k: pytest.fail("trained"))
    assert 0.02 < EclipseDataModule(small_digits(), model_dir=str(tmp_path)).certified_sigma < 0.03  # t*=100 of 4000
    assert eclipse(tmp_path, diffusion=False).certified_sigma is None  # compensation noise alone: clamped


def test_b_plus_c_ablation_trains_and_purifies_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(SparseDenoiserBuilder, "train", lambda *a, **k: pytest.fail("trained"))
    base = small_digits()
    dm = eclipse(tmp_path, base=base, diffusion=False)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.train_set is base.train_set and not (tmp_path / "purified").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clean_fraction": 0.0}, "clean_fraction"),
        ({"clean_size": 0}, "clean_size"),
        ({"replication": -1}, "replication"),
        ({"t_star": 0}, "t_star"),
        ({"t_star": 101}, "t_star"),
        ({"grayscale_p": 1.5}, "grayscale_p"),
        ({"noise_std": -0.1}, "noise_std"),
        ({"train_steps": 0}, "train_steps"),
        ({"storage": "png"}, "storage"),
    ],
)
def test_argument_errors(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        eclipse(tmp_path, **kwargs)


def test_sparse_set_errors(tmp_path):
    with pytest.raises(TypeError, match="clean_subset"):
        eclipse(tmp_path, clean_subset="all")
    with pytest.raises(ValueError, match=r"clean_subset indices .* \[0, 90\)"):
        eclipse(tmp_path, clean_subset=[0, 90]).sparse_set()
    with pytest.raises(ValueError, match="validation split has 90"):
        eclipse(tmp_path, clean_size=91).sparse_set()
    with pytest.raises(ValueError, match="shaped"):
        eclipse(tmp_path, clean_subset=small_digits(channels=1)).sparse_set()


class ValIsTestDigits(DigitsDataModule):
    """A base whose validation split is its test split, as ``CIFAR10DataModule(val_fraction=0)``."""

    def setup(self, stage=None):
        super().setup(stage)
        self.val_set = self.test_set


def test_refuses_a_sparse_set_that_overlaps_the_test_split(tmp_path):
    """The diffusion model must never learn a test image: by identity of the split, and by content."""
    with pytest.raises(ValueError, match="validation split is its test split.*val_fraction.*clean_subset"):
        eclipse(tmp_path, base=ValIsTestDigits(image_size=8, num_channels=3, val_fraction=0.05, test_fraction=0.85)).sparse_set()
    # the test images again, as another dataset object: found by their content
    copied = small_digits()
    copied.setup("fit")
    test_x, test_y = copied.test_set.images, copied.test_set.labels
    copied.val_set = IndexedDataset(test_x.clone(), test_y.clone())
    with pytest.raises(ValueError, match=r"(\d+) of the \1 sparse-set images D_s \(from the validation split.*test split"):
        eclipse(tmp_path, base=copied).sparse_set()
    # a single test image among the validation images, picked by index
    mixed = small_digits()
    mixed.setup("fit")
    val = mixed.val_set
    mixed.val_set = IndexedDataset(torch.cat([val.images, test_x[5:6]]), torch.cat([val.labels, test_y[5:6]]))
    assert torch.equal(eclipse(tmp_path, base=mixed, clean_subset=[0, 1]).sparse_set(), val.images[:2])
    with pytest.raises(ValueError, match=r"1 of the 2 sparse-set images D_s .*positions \[1\]"):
        eclipse(tmp_path, base=mixed, clean_subset=[0, len(val)]).sparse_set()
    # a clean datamodule split with another seed (its training split holds many of base's test images),
    # and one whose training split holds a single test image of base
    with pytest.raises(ValueError, match=r"\d+ of the \d+ sparse-set images D_s \(from the training split"):
        eclipse(tmp_path, clean_subset=small_digits(seed=3)).sparse_set()
    clean = small_digits()
    clean.setup("fit")
    clean.train_set = IndexedDataset(torch.cat([clean.train_set.images, test_x[:1]]), torch.cat([clean.train_set.labels, test_y[:1]]))
    with pytest.raises(ValueError, match=r"1 of the \d+ sparse-set images D_s \(from the training split of DigitsDataModule"):
        eclipse(tmp_path, clean_subset=clean).sparse_set()


def test_cifar10_default_draws_the_sparse_set_from_held_out_training_images(tmp_path):
    data = tmp_path / "cifar10"
    data.mkdir()
    expected = make_archive(data, as_tar=True, n=40)  # 200 training images, 40 test images
    with pytest.raises(ValueError, match="validation split is its test split"):
        eclipse(tmp_path, base=CIFAR10DataModule(str(data), val_fraction=0)).sparse_set()
    base = CIFAR10DataModule(str(data), batch_size=16)  # the default: a seeded 10% of the training file
    sparse = eclipse(tmp_path, base=base).sparse_set()
    assert len(sparse) == round(0.1 * 180) and base.val_set is not base.test_set
    train_file = torch.from_numpy(np.concatenate([expected[n][0] for n in TRAIN_BATCHES]))
    held_out = train_file[seeded_split(len(train_file), (0.1,), seed=0)[0]]
    as_uint8 = (sparse * 255).round().to(torch.uint8)
    assert torch.equal(sparse, as_uint8.float() / 255)
    sparse_keys = [fingerprint(x) for x in as_uint8]
    assert len(set(sparse_keys)) == len(sparse)
    assert set(sparse_keys) <= {fingerprint(x) for x in held_out}
    assert not set(sparse_keys) & {fingerprint(x) for x in torch.from_numpy(expected[TEST_BATCH][0])}


def _eclipse_fit_args(out, devices):
    """`lightning-defense fit` on configs/digits/eclipse.yaml shrunk to 8x8 and a tiny DDPM, writing under ``out``."""
    base = "--data.init_args.base.init_args."
    data = "--data.init_args."
    return [
        "fit", "--config", str(ROOT / "configs/digits/eclipse.yaml"),
        f"{base}image_size=8", f"{base}val_fraction=0.05", f"{base}test_fraction=0.85", f"{base}batch_size=32",
        f"{data}clean_fraction=0.1", f"{data}t_star=3", f"{data}num_train_timesteps=100",
        f"{data}block_out_channels=[16,32]", f"{data}attention_resolutions=[4]", f"{data}num_heads=2",
        f"{data}train_steps=3", f"{data}train_batch_size=16", f"{data}batch_size=64", f"{data}chunk_size=64",
        f"{data}device=cpu", f"{data}progress=false",
        f"{data}model_dir={out / 'models'}", f"{data}cache_dir={out / 'purified'}",
        f"--trainer.devices={devices}", "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false", "--trainer.deterministic=false", "--test_after_fit=false",
        f"--trainer.default_root_dir={out}",
    ] + (["--trainer.strategy=ddp"] if devices > 1 else [])


def _tree_bytes(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def test_two_process_ddp_trains_the_model_once_on_rank_zero_and_matches_one_process(tmp_path):
    """Under DDP rank 0 trains and writes the sparse-set DDPM (the other rank waits at the barrier), and the
    model and purified training set are byte-identical to a 1-process run's."""
    from lightning_defense.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what Lightning gives each of the 2 DDP ranks on 2 cores: same float reduction order
    try:
        main(_eclipse_fit_args(tmp_path / "one", devices=1))
    finally:
        torch.set_num_threads(threads)
    cmd = [sys.executable, "-m", "lightning_defense.cli", *_eclipse_fit_args(tmp_path / "two", devices=2)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output
    assert output.count("training the ECLIPSE diffusion model") == 1  # rank 0 only
    one_models, two_models = _tree_bytes(tmp_path / "one" / "models"), _tree_bytes(tmp_path / "two" / "models")
    assert any(name.endswith(".safetensors") for name in two_models)
    assert not any(".tmp" in name for name in two_models)  # the atomic rename left no partial model
    assert two_models == one_models
    one_purified, two_purified = _tree_bytes(tmp_path / "one" / "purified"), _tree_bytes(tmp_path / "two" / "purified")
    assert sum(name.endswith(".npy") for name in two_purified) == 3  # 180 training images in chunks of 64
    assert {k: v for k, v in two_purified.items() if k.endswith(".npy")} == \
        {k: v for k, v in one_purified.items() if k.endswith(".npy")}

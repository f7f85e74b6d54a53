"""Every defense on three projects written without lightning_defense, each with at most two changed lines.

The projects (``tests/integration/projects``) are written as Lightning's and torchvision's docs write
them: ``(x, y)`` tuples with ``Compose([RandomCrop, RandomHorizontalFlip, ToTensor, Normalize])`` in the
dataset, dict batches normalised in ``__getitem__``, an ``ImageFolder`` behind ``random_split``. Each test
is the user's fit with the changed lines marked ``# <- changed``, then checks that the defense acted in
[0, 1] pixel space and that the user's layout and normalisation reached ``training_step`` untouched.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lightning_defense.callbacks import AdversarialTraining, DPSGD, FriendsNoise, WarmStart
from lightning_defense.certify import TrainingOptions, run_certification
from lightning_defense.core.pixels import Layout, PixelSpace, PixelView
from lightning_defense.datamodules import DiffusionPurifiedDataModule, EclipseDataModule
from lightning_defense.diffusion.denoise import noise_and_denoise, timestep_for_sigma
from lightning_defense.diffusion.denoiser import load_denoiser
from tests.diffusion._tiny import save_tiny_ddpm
from tests.integration.projects import dict_batches, image_folder, torchvision_style

PROJECTS = ("torchvision_style", "dict_batches", "image_folder")


class Project:
    """One user project: its datamodule, its module, and where its images sit in a batch."""

    def __init__(self, name: str, tmp_path):
        self.name = name
        if name == "torchvision_style":
            self.make_data, self.make_module = torchvision_style.CIFARDataModule, torchvision_style.LitClassifier
            self.channels, self.space = 3, PixelSpace.of((torchvision_style.MEAN, torchvision_style.STD))
        elif name == "dict_batches":
            self.make_data, self.make_module = dict_batches.StripesDataModule, dict_batches.StripesClassifier
            self.channels, self.space = 1, PixelSpace.of(((dict_batches.MEAN,), (dict_batches.STD,)))
        else:
            root = image_folder.write_image_folder(tmp_path / "folder")
            self.make_data = lambda: image_folder.FolderDataModule(str(root))
            self.make_module = image_folder.FolderClassifier
            self.channels, self.space = 3, PixelSpace.of((image_folder.MEAN, image_folder.STD))
        self.module_path = f"{self.make_module.__module__}.{self.make_module.__qualname__}"

    def data(self):
        """The user's datamodule; the dict project states its normalisation once (its one extra changed line)."""
        dm = self.make_data()
        if self.name == "dict_batches":
            dm.normalization = ((dict_batches.MEAN,), (dict_batches.STD,))  # <- changed
        return dm

    def images(self, batch):
        return Layout.detect(batch).split(batch)[0]


class Spy(L.Callback):
    """Records (a copy of) every training batch as ``training_step`` receives it, with its epoch."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        copy = {k: v.clone() for k, v in batch.items()} if isinstance(batch, dict) else tuple(v.clone() for v in batch)
        self.batches.append((trainer.current_epoch, copy))


def fit(project, tmp_path, callbacks=(), datamodule=None, epochs=2):
    spy = Spy()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                        callbacks=[*callbacks, spy], limit_val_batches=0)
    trainer.fit(project.make_module(), datamodule=datamodule if datamodule is not None else project.data())
    return trainer, spy


def assert_user_form(project, spy):
    """Every batch kept the user's layout and normalisation: un-normalised it is pixels, nothing clamped."""
    assert spy.batches
    for _, batch in spy.batches:
        assert isinstance(batch, dict) == (project.name == "dict_batches")
        assert len(batch) == 2
        images = project.images(batch)
        assert images.shape[1] == project.channels
    values = torch.cat([project.images(b).flatten() for _, b in spy.batches])
    assert values.min() < -0.5, "the user's normalisation (mean subtracted) must reach training_step"


@pytest.fixture(params=PROJECTS)
def project(request, tmp_path):
    return Project(request.param, tmp_path)


def test_friends_noise(project, tmp_path):
    trainer, spy = fit(project, tmp_path, [FriendsNoise(begin_epoch=1, steps=3, noise_type=None, batch_size=16)])  # <- changed
    friends = trainer.callbacks[0]
    noise = friends.friendly_noise
    view = PixelView(_train_set(project), owner=project.data())
    assert noise.shape[0] == len(view) and noise.abs().max() <= friends.zeta + 1e-6 and noise.abs().max() > 0
    assert_user_form(project, spy)
    # Epoch 1 batches hold each sample's friendly noise: un-normalised, they are pixels again ([0, 1]).
    for epoch, batch in spy.batches:
        pixels = project.space.to_pixels(project.images(batch))
        assert pixels.min() > -1e-4 and pixels.max() < 1 + 1e-4
    # Aligned: sample i of the defended training set is the user's sample i plus friendly noise i, through the
    # same random crop/flip (same torch seed for both reads).
    defended = trainer.train_dataloader.dataset
    original = _train_set(project)
    for i in (0, 5):
        torch.manual_seed(i)
        got = project.space.to_pixels(_image(defended[i]))  # one read each: a read draws the augmentation
        torch.manual_seed(i)
        raw = project.space.to_pixels(_image(original[i]))
        expected = (view.item_pixels(i)[0] + noise[i]).clamp(0, 1) - view.item_pixels(i)[0]
        torch.manual_seed(i)
        replay = _augment_like(project, original, expected)
        inside = (raw > 0.1) & (raw < 0.9)
        assert torch.allclose((got - raw)[inside], replay[inside], atol=2e-3)
        misaligned = (view.item_pixels(i)[0] + noise[i + 1]).clamp(0, 1) - view.item_pixels(i)[0]
        torch.manual_seed(i)
        assert not torch.allclose((got - raw)[inside], _augment_like(project, original, misaligned)[inside], atol=2e-3)


def _image(item):
    return Layout.detect(item).split(item)[0]


def _train_set(project):
    dm = project.data()
    dm.setup("fit")
    return dm.train_dataloader().dataset


def _augment_like(project, dataset, tensor):
    """``tensor`` through the random ops of the user's training transform (none for the dict project)."""
    holder = dataset.dataset if hasattr(dataset, "indices") else dataset
    transform = getattr(holder, "transform", None)
    if transform is None:
        return tensor
    ops = [op for op in transform.transforms if type(op).__name__.startswith("Random")]
    for op in ops:
        tensor = op(tensor)
    return tensor


def test_adversarial_training(project, tmp_path):
    before = Spy()
    trainer, after = fit(project, tmp_path, [before, AdversarialTraining(eps=8 / 255, steps=2)], epochs=1)  # <- changed
    assert_user_form(project, after)
    for (_, clean), (_, adversarial) in zip(before.batches, after.batches):
        delta = project.space.to_pixels(project.images(adversarial)) - project.space.to_pixels(project.images(clean))
        assert delta.abs().max() <= 8 / 255 + 1e-4 and delta.abs().max() > 4 / 255  # the eps ball, in pixels


def test_dp_sgd(project, tmp_path):
    trainer, spy = fit(project, tmp_path, [DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, seed=0, replace_batchnorm=True)])  # <- changed
    assert_user_form(project, spy)
    epsilon = trainer.callbacks[0].epsilon
    assert 0 < epsilon < math.inf


def test_warm_start(project, tmp_path):
    warm = WarmStart(epochs=1, wrapper="lightning_defense.datamodules.GaussianNoiseDataModule",  # <- changed
                     wrapper_kwargs={"sigma": 0.2})
    trainer, spy = fit(project, tmp_path, [warm])
    assert_user_form(project, spy)
    pixels = {e: torch.cat([project.space.to_pixels(project.images(b)).flatten() for ep, b in spy.batches if ep == e])
              for e in (0, 1)}
    assert pixels[0].min() > -1e-4 and pixels[0].max() < 1 + 1e-4  # the tampered data as they are
    assert pixels[1].min() < -0.2 and pixels[1].max() > 1.2  # then x + N(0, 0.2^2), unclipped as the certificate needs


def test_diffusion_purified(project, tmp_path):
    ddpm = save_tiny_ddpm(tmp_path / "ddpm", channels=project.channels, size=8)
    dm = DiffusionPurifiedDataModule(project.data(), denoiser=ddpm, sigma=0.25, cache_dir=str(tmp_path / "cache"),  # <- changed
                                     progress=False, device="cpu", storage="float16")
    trainer, spy = fit(project, tmp_path, datamodule=dm, epochs=1)
    assert len(spy.batches) > 0
    # The purified pixels are Pseudocode 1 applied to the user's pixels, then the user's transform tail.
    view = PixelView(_train_set(project), owner=project.data())
    raw, _ = view.tensors()
    denoiser = load_denoiser(ddpm)
    t_star = timestep_for_sigma(denoiser.alphas_cumprod, 0.25)
    expected = noise_and_denoise(denoiser, raw, torch.arange(len(raw)), denoiser.alphas_cumprod, t_star, 0.25, 0, 1,
                                 denoiser.variance_type)
    purified = trainer.datamodule.train_set
    got = project.space.to_pixels(_image(purified[3]))
    if project.name == "dict_batches":  # no augmentation: sample 3 is exactly purified pixel 3
        assert torch.allclose(got, expected[3], atol=2e-3)
    assert (expected - raw).abs().mean() > 0.01
    assert got.min() > -1e-3 and got.max() < 1 + 1e-3


def test_eclipse(project, tmp_path):
    dm = EclipseDataModule(project.data(), clean_fraction=0.1, replication=2, t_star=3, num_train_timesteps=100,  # <- changed
                           block_out_channels=(16, 32), layers_per_block=1, attention_resolutions=(4,), num_heads=2,
                           train_steps=2, train_batch_size=8, model_dir=str(tmp_path / "m"),
                           cache_dir=str(tmp_path / "c"), batch_size=16, chunk_size=16, progress=False, device="cpu")
    trainer, spy = fit(project, tmp_path, datamodule=dm, epochs=1)
    assert_user_form(project, spy)
    raw, _ = PixelView(_train_set(project), owner=project.data()).tensors()
    purified = trainer.datamodule.train_set
    got = torch.stack([project.space.to_pixels(_image(purified[i])) for i in range(4)])
    assert (got - raw[:4]).abs().mean() > 1e-3


def test_certification(project, tmp_path):
    result = run_certification(
        project.data(), model={"class_path": project.module_path},  # <- changed
        smoothing={"class_path": "lightning_defense.datamodules.GaussianNoiseDataModule", "init_args": {"sigma": 0.05}},
        num_models=7, n0=1, alpha=0.05, training=TrainingOptions(max_epochs=4, accelerator="cpu"),
        output_dir=str(tmp_path / "certify"), progress_bar=False,
    )
    import csv

    rows = list(csv.DictReader(open(result.files["certificates"])))
    radii = [float(row["radius"]) for row in rows if int(row["prediction"]) != -1]
    assert radii and max(radii) > 0, "some test point must be certified with a radius"
    assert result.summary["certified_accuracy"]["0"] > 0.5

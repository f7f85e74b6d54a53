"""The data-rewriting defenses and WarmStart on a user's own LightningDataModule (issue 16).

Each project of ``tests/integration/projects`` is wrapped as it is (the dict one states its normalisation
once), fitted with the user's own module, and checked in pixel space against pixels read here without the
library: the rewrite is the expected one, the user's layout, normalisation and augmentation still apply.
"""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from lightning.pytorch.callbacks import Callback
from torchvision.datasets import ImageFolder

from lightning_defense.callbacks import WarmStart
from lightning_defense.datamodules import (
    DeepKNNFilterDataModule,
    DiffusionPurifiedDataModule,
    GaussianNoiseDataModule,
    ShortcutSqueezeDataModule,
)
from lightning_defense.datamodules import deep_knn
from lightning_defense.datamodules.eclipse import EclipseDataModule
from lightning_defense.diffusion import load_denoiser, noise_and_denoise, timestep_for_sigma
from tests.diffusion._tiny import save_tiny_ddpm
from tests.integration.projects import dict_batches, image_folder, torchvision_style

PROJECTS = ("dict_batches", "torchvision_style", "image_folder")
STRIPES_NORMALIZATION = ((0.5,), (0.25,))


class Project:
    """One user project: its datamodule, its module, its constants, and its raw training pixels read here."""

    def __init__(self, name, tmp_path):
        self.name = name
        if name == "dict_batches":
            self.datamodule = dict_batches.StripesDataModule()
            self.datamodule.normalization = STRIPES_NORMALIZATION  # the user's one changed line
            self.model = dict_batches.StripesClassifier
            self.mean, self.std = (dict_batches.MEAN,), (dict_batches.STD,)
            self.channels, self.pad, self.flip = 1, 0, False
        elif name == "torchvision_style":
            self.datamodule, self.model = torchvision_style.CIFARDataModule(), torchvision_style.LitClassifier
            self.mean, self.std = torchvision_style.MEAN, torchvision_style.STD
            self.channels, self.pad, self.flip = 3, 2, True
        else:
            self.root = image_folder.write_image_folder(tmp_path / "folder")
            self.datamodule, self.model = image_folder.FolderDataModule(str(self.root)), image_folder.FolderClassifier
            self.mean, self.std = image_folder.MEAN, image_folder.STD
            self.channels, self.pad, self.flip = 3, 0, True
        self.datamodule.setup("fit")

    def raw(self, split="train"):
        """The split's images as [0, 1] pixels, in index order, before any transform's randomness."""
        dm = self.datamodule
        if self.name == "dict_batches":
            return {"train": dm.train_ds, "val": dm.val_ds, "test": dm.test_ds}[split].pixels
        if self.name == "torchvision_style":
            data = {"train": dm.cifar_train, "val": dm.cifar_val, "test": dm.cifar_test}[split].data
            return torch.from_numpy(data).permute(0, 3, 1, 2).float() / 255
        full = ImageFolder(str(self.root), transform=T.Compose([T.Resize((8, 8)), T.ToTensor()]))
        subset = {"train": dm.train_ds, "val": dm.val_ds, "test": dm.test_ds}[split]
        return torch.stack([full[i][0] for i in subset.indices])

    def images(self, batch):
        return batch["image"] if self.name == "dict_batches" else batch[0]

    def to_pixels(self, images):
        mean, std = torch.tensor(self.mean).view(-1, 1, 1), torch.tensor(self.std).view(-1, 1, 1)
        return images * std + mean

    def augmented(self, pixels):
        """Every image the user's augmentation can make of ``pixels`` (crop offsets of the zero padding, flips)."""
        out = [pixels]
        if self.pad:
            size, padded = pixels.shape[-1], F.pad(pixels, (self.pad,) * 4)
            offsets = range(2 * self.pad + 1)
            out = [padded[..., dy:dy + size, dx:dx + size] for dy in offsets for dx in offsets]
        if self.flip:
            out += [o.flip(-1) for o in out]
        return torch.cat(out)

    def check_layout(self, batch):
        if self.name == "dict_batches":
            assert isinstance(batch, dict) and set(batch) == {"image", "label"}
        else:
            assert isinstance(batch, (list, tuple)) and len(batch) == 2 and batch[1].dtype == torch.int64


def nearest(images, candidates):
    """The distance of every image to its nearest candidate."""
    return torch.cdist(images.flatten(1).double(), candidates.flatten(1).double()).min(1).values


class RecordBatches(Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((trainer.current_epoch, {k: v.clone() for k, v in batch.items()} if isinstance(batch, dict)
                             else [v.clone() for v in batch]))


def fit(project, datamodule, tmp_path, epochs=1, callbacks=()):
    recorder = RecordBatches()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[*callbacks, recorder])
    trainer.fit(project.model(), datamodule=datamodule)
    assert trainer.global_step == epochs * -(-len(project.raw()) // 16)  # batches of 16: every batch ran
    return recorder.batches


def check_fit_batches(project, batches, rewritten):
    """Every training batch is the user's layout, normalised as the user does, and holds the rewritten pixels
    with the user's augmentation."""
    candidates = project.augmented(rewritten)
    for _, batch in batches:
        project.check_layout(batch)
        images = project.images(batch)
        assert images.min() < -0.1  # normalised values below 0 survive: nothing clamped to [0, 1]
        assert nearest(project.to_pixels(images), candidates).max() < 1e-4


def check_augmentation(project, wrapped):
    reads = torch.stack([project.images(wrapped.train_set[0]) for _ in range(30)])
    varies = not all(torch.equal(read, reads[0]) for read in reads)
    assert varies == (project.pad > 0 or project.flip)


@pytest.fixture(scope="module")
def ddpms(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddpm")
    return {1: save_tiny_ddpm(root / "gray", 1, size=8), 3: save_tiny_ddpm(root / "rgb", 3, size=8)}


@pytest.mark.parametrize("name", PROJECTS)
def test_gaussian_noise_on_a_user_project(name, tmp_path):
    project, sigma = Project(name, tmp_path), 0.1
    wrapped = GaussianNoiseDataModule(project.datamodule, sigma=sigma, seed=0)
    batches = fit(project, wrapped, tmp_path)
    raw, (noisy, labels) = project.raw(), wrapped.train_tensors()
    residual = noisy - raw
    assert abs(residual.std().item() - sigma) < 0.1 * sigma and abs(residual.mean().item()) < 0.02
    assert noisy.min() < 0  # the noise is not clipped in pixel space either
    assert wrapped.num_channels == project.channels and len(labels) == len(raw)
    check_fit_batches(project, batches, noisy)
    d = raw[0].numel()
    seen = torch.cat([project.to_pixels(project.images(b)) for _, b in batches])
    assert nearest(seen, project.augmented(raw)).min() > 0.5 * sigma * d ** 0.5  # no batch holds a raw image
    check_augmentation(project, wrapped)


@pytest.mark.parametrize("name", PROJECTS)
def test_diffusion_purification_on_a_user_project(name, tmp_path, ddpms):
    project, sigma = Project(name, tmp_path), 0.25
    wrapped = DiffusionPurifiedDataModule(project.datamodule, ddpms[project.channels], sigma=sigma, seed=0,
                                          batch_size=64, chunk_size=64, cache_dir=str(tmp_path / "cache"),
                                          device="cpu", progress=False)
    batches = fit(project, wrapped, tmp_path)
    raw, purified = project.raw(), wrapped.train_tensors()[0]
    assert purified.shape == raw.shape and 0 <= purified.min() and purified.max() <= 1
    assert 0.02 < (purified - raw).abs().mean() < 0.5  # the tiny random UNet changes them, within the pixel range
    # image i is the denoised noisy raw pixels of sample i: the denoiser got the user's images as pixels
    denoiser = load_denoiser(ddpms[project.channels])
    t_star, pick = timestep_for_sigma(denoiser.alphas_cumprod, sigma), torch.tensor([0, 7, len(raw) - 1])
    with torch.inference_mode():
        direct = noise_and_denoise(denoiser, raw[pick], pick, denoiser.alphas_cumprod, t_star, sigma, 0)
    assert (direct - purified[pick]).abs().max() <= 1 / 255 + 1e-6
    check_fit_batches(project, batches, purified)
    check_augmentation(project, wrapped)


@pytest.mark.parametrize("name", ["dict_batches", "torchvision_style"])
def test_eclipse_on_a_user_project(name, tmp_path, monkeypatch):
    project = Project(name, tmp_path)
    wrapped = EclipseDataModule(
        project.datamodule, clean_fraction=0.1, replication=4, t_star=3, num_train_timesteps=100,
        block_out_channels=(16, 32), layers_per_block=1, attention_resolutions=(4,), num_heads=2, train_steps=3,
        train_batch_size=16, model_dir=str(tmp_path / "models"), cache_dir=str(tmp_path / "purified"), batch_size=64,
        chunk_size=64, progress=False, device="cpu",
    )
    sparse = wrapped.sparse_set()  # D_s: pixels of the user's validation split
    assert len(sparse) == 5 and nearest(sparse, project.raw("val")).max() < 1e-6
    calls, original = [], EclipseDataModule.train_batch_transform

    def recording(self, images, generator):
        out = original(self, images, generator)
        calls.append((images.clone(), out.clone()))
        return out

    monkeypatch.setattr(EclipseDataModule, "train_batch_transform", recording)
    batches = fit(project, wrapped, tmp_path)
    purified = wrapped.train_tensors()[0]
    assert 0 < (purified - project.raw()).abs().mean() and len(calls) == len(batches)
    candidates = project.augmented(purified)
    for (inputs, outputs), (_, batch) in zip(calls, batches):
        project.check_layout(batch)
        assert nearest(inputs, candidates).max() < 1e-4  # the compensation got the purified batch as pixels
        assert 0 <= outputs.min() and outputs.max() <= 1 and (outputs - inputs).abs().mean() > 0.01
        images = project.images(batch)
        assert images.min() < -0.1 and torch.allclose(project.to_pixels(images), outputs, atol=1e-5)


@pytest.mark.parametrize("name", ["dict_batches", "image_folder"])
def test_warm_start_switches_a_user_datamodule_to_the_purified_pixels(name, tmp_path):
    project, sigma = Project(name, tmp_path), 0.2
    warm = WarmStart(epochs=1, wrapper=GaussianNoiseDataModule, wrapper_kwargs={"sigma": sigma})
    batches = fit(project, project.datamodule, tmp_path, epochs=2, callbacks=[warm])
    raw, purified = project.raw(), warm.purified_datamodule.train_tensors()[0]
    assert abs((purified - raw).std().item() - sigma) < 0.1 * sigma
    assert {epoch for epoch, _ in batches} == {0, 1}
    for epoch, batch in batches:
        project.check_layout(batch)
        pixels = project.to_pixels(project.images(batch))
        expected, other = (raw, purified) if epoch == 0 else (purified, raw)
        assert nearest(pixels, project.augmented(expected)).max() < 1e-4
        assert nearest(pixels, project.augmented(other)).min() > 0.1
    assert warm.state_dict() == {"switched_at": 1}


def test_warm_start_refuses_a_purified_set_of_another_length_on_a_user_datamodule(tmp_path):
    class Bigger(dict_batches.StripesDataModule):
        normalization = STRIPES_NORMALIZATION

        def setup(self, stage=None):
            super().setup(stage)
            self.train_ds = dict_batches.StripesDataset(60, 0)

    project = Project("dict_batches", tmp_path)
    warm = WarmStart(epochs=1, purified=GaussianNoiseDataModule(Bigger(), sigma=0.1))
    with pytest.raises(ValueError, match="purified training set has 60 samples but the tampered one has 48"):
        fit(project, project.datamodule, tmp_path, epochs=2, callbacks=[warm])


def test_shortcut_squeezing_and_nested_wrappers_on_a_user_project(tmp_path):
    project = Project("torchvision_style", tmp_path)
    squeezed = ShortcutSqueezeDataModule(project.datamodule, method="grayscale")
    batches = fit(project, squeezed, tmp_path)
    gray = squeezed.train_tensors()[0]
    raw = project.raw()
    luma = (raw * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True).expand_as(raw)
    assert torch.allclose(gray, luma, atol=1e-6)
    check_fit_batches(project, batches, gray)
    # a wrapper of a wrapper of the user's datamodule rewrites the inner rewrite, in the user's form
    inner = GaussianNoiseDataModule(project.datamodule, sigma=0.1, seed=0)
    outer = GaussianNoiseDataModule(inner, sigma=0.1, seed=1)
    batches = fit(project, outer, tmp_path)
    twice = outer.train_tensors()[0]
    assert abs((twice - inner.train_tensors()[0]).std().item() - 0.1) < 0.01
    check_fit_batches(project, batches, twice)


def test_deep_knn_keeps_the_users_own_items(tmp_path, monkeypatch):
    project = Project("dict_batches", tmp_path)
    removed = torch.zeros(48, dtype=torch.bool)
    removed[[0, 5, 17, 30, 47]] = True
    seen = {}

    def disagreement(features, labels, k, num_classes, chunk=1024):
        seen.update(features=features, labels=labels, num_classes=num_classes)
        return removed

    monkeypatch.setattr(deep_knn, "knn_disagreement", disagreement)
    wrapped = DeepKNNFilterDataModule(project.datamodule, k=5, epochs=1, backbone="small_cnn")
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(project.model(), datamodule=wrapped)
    assert seen["num_classes"] == 2 and torch.equal(seen["labels"], project.datamodule.train_ds.labels)
    kept = (~removed).nonzero().flatten()
    assert torch.equal(wrapped.kept_indices, kept) and len(wrapped.train_set) == 43
    for j, i in enumerate(kept.tolist()):
        item, user = wrapped.train_set[j], project.datamodule.train_ds[i]
        assert torch.allclose(item["image"], user["image"], atol=1e-6) and item["label"] == user["label"]
    loader = wrapped.train_dataloader()
    assert loader.batch_sampler.batch_size == 16 and sum(len(b["label"]) for b in loader) == 43
    assert trainer.global_step == 3


def test_unknown_or_wrong_normalisation_is_a_clear_error_naming_the_fix(tmp_path, ddpms):
    undeclared = dict_batches.StripesDataModule()  # normalised in __getitem__, nothing says how
    with pytest.raises(ValueError, match=r"GaussianNoiseDataModule: got training set values in \[-0.99.*outside "
                                         r"\[0, 1\] pixels, and no normalization is known.*never clamps.*"
                                         r"normalization=\(\(mean"):
        GaussianNoiseDataModule(undeclared).setup("fit")
    # the fix it names, as the defense's argument: the same rewrite as with the datamodule's attribute
    given = GaussianNoiseDataModule(undeclared, sigma=0.1, normalization=STRIPES_NORMALIZATION)
    given.setup("fit")
    declared = GaussianNoiseDataModule(Project("dict_batches", tmp_path).datamodule, sigma=0.1)
    declared.setup("fit")
    assert torch.equal(given.train_tensors()[0], declared.train_tensors()[0])
    assert given.train_tensors()[0].min() < 0 and given.train_set[0]["image"].min() < -0.5
    with pytest.raises(ValueError, match=r"DiffusionPurifiedDataModule: .*outside \[0, 1\].*normalization="):
        DiffusionPurifiedDataModule(undeclared, ddpms[1], cache_dir=str(tmp_path), device="cpu",
                                    progress=False).setup("fit")
    wrong = dict_batches.StripesDataModule()
    wrong.normalization = ((0.5,), (0.5,))
    with pytest.raises(ValueError, match=r"un-normalising the training set with mean=\(0.5,\), std=\(0.5,\).*"
                                         r"not how these"):
        ShortcutSqueezeDataModule(wrong).setup("fit")
    project = Project("torchvision_style", tmp_path)
    with pytest.raises(ValueError, match="takes 1-channel images; the training images have 3 channels"):
        DiffusionPurifiedDataModule(project.datamodule, ddpms[1], cache_dir=str(tmp_path), device="cpu",
                                    progress=False).setup("fit")


def test_purification_refuses_a_user_split_that_changes_between_setups(tmp_path, ddpms):
    """A user's unseeded random_split builds another training set at every setup(): the purified images
    (from the first) would be paired with the labels of the second. Today's code did that silently."""

    class UnseededFolder(image_folder.FolderDataModule):
        def setup(self, stage=None):
            transform = T.Compose([T.Resize((image_folder.SIZE, image_folder.SIZE)), T.ToTensor(),
                                   T.Normalize(image_folder.MEAN, image_folder.STD)])
            full = ImageFolder(self.root, transform=transform)
            self.train_ds, self.val_ds, self.test_ds = torch.utils.data.random_split(full, [32, 8, 8])  # no seed

    root = image_folder.write_image_folder(tmp_path / "folder")
    wrapped = DiffusionPurifiedDataModule(UnseededFolder(str(root)), ddpms[3], sigma=0.25, cache_dir=str(tmp_path / "c"),
                                          device="cpu", progress=False)
    wrapped.prepare_data()
    with pytest.raises(ValueError, match="setup\\(\\) is not deterministic"):
        wrapped.setup("fit")

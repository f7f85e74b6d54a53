"""run_certification on a user's own LightningModule and LightningDataModule (tests/integration/projects)."""

import csv

import numpy as np
import pytest
import torch

from lightning_defense.certify import TrainingOptions, run_certification
from lightning_defense.datamodules import DigitsDataModule
from tests.integration.projects import dict_batches, torchvision_style

LIT = {"class_path": "tests.integration.projects.torchvision_style.LitClassifier", "init_args": {"lr": 0.05}}
STRIPES = {"class_path": "tests.integration.projects.dict_batches.StripesClassifier"}
GAUSS = {"class_path": "lightning_defense.datamodules.GaussianNoiseDataModule", "init_args": {"sigma": 0.1}}
TRAIN = TrainingOptions(max_epochs=5, accelerator="cpu")


class NormalizedStripes(dict_batches.StripesDataModule):
    normalization = (dict_batches.MEAN, dict_batches.STD)  # the user's one added line


def certify(data, model, out, **kwargs):
    args = dict(smoothing=GAUSS, num_models=6, n0=1, alpha=0.1, training=TRAIN, output_dir=out, progress_bar=False)
    args.update(kwargs)
    return run_certification(data, model=model, **args)


def spy_training_steps(monkeypatch, cls):
    """Record every batch each module instance's training_step gets: {module: [batch, ...]} (keyed by the module
    itself, which keeps it alive: an id() could be reused by the next model once the last one is freed)."""
    seen, real = {}, cls.training_step

    def training_step(self, batch, batch_idx):
        seen.setdefault(self, []).append(batch)
        return real(self, batch, batch_idx)

    monkeypatch.setattr(cls, "training_step", training_step)
    return seen


def radii(out):
    with open(out / "certificates.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return np.array([float(r["radius"]) for r in rows]), np.array([int(r["correct"]) for r in rows], dtype=bool)


def test_torchvision_style_project_certifies_and_resumes(tmp_path, monkeypatch):
    seen = spy_training_steps(monkeypatch, torchvision_style.LitClassifier)
    result = certify(torchvision_style.CIFARDataModule(), LIT, tmp_path)
    assert result.complete and result.trained == list(range(6)) and len(seen) == 6
    radius, correct = radii(tmp_path)
    assert (correct & (radius > 0)).any(), "no test point certified: the test tests nothing"
    assert result.summary["certified_accuracy"]["0"] > 0.5 and result.summary["sigma"] == 0.1

    # each model trained by its own training_step on (x, y) batches of the user's loader (batch size 16, 3
    # batches an epoch), normalised as the user normalises and noised in pixel space, never clamped
    for batches in seen.values():
        assert len(batches) == 5 * 3 and all(isinstance(b, (list, tuple)) and len(b) == 2 for b in batches)
        x = torch.cat([b[0] for b in batches])
        assert x.shape[1:] == (3, 8, 8) and max(len(b[0]) for b in batches) == 16
        mean = torch.tensor(torchvision_style.MEAN).view(1, 3, 1, 1)
        pixels = x * torch.tensor(torchvision_style.STD).view(1, 3, 1, 1) + mean
        assert -0.5 < pixels.min() < 0.0 and 1.0 < pixels.max() < 1.5  # noise beyond [0, 1], not clamped
        assert x.min() < -1.0  # the user's space, not pixels
    # model i saw its own smoothed set: the first batches of the models differ
    firsts = [batches[0][0] for batches in seen.values()]
    assert not torch.equal(firsts[0], firsts[1])

    # resume: nothing is trained again, the certificates are the same bytes
    before = (tmp_path / "certificates.csv").read_bytes()
    seen.clear()
    again = certify(torchvision_style.CIFARDataModule(), LIT, tmp_path)
    assert again.complete and again.trained == [] and not seen
    assert (tmp_path / "certificates.csv").read_bytes() == before and np.array_equal(again.votes, result.votes)
    # the key holds the class path and its init_args: other init_args are another configuration
    with pytest.raises(ValueError, match="different configuration.*model"):
        certify(torchvision_style.CIFARDataModule(), {**LIT, "init_args": {"lr": 0.1}}, tmp_path)


def test_dict_batches_with_normalization_attribute_certify(tmp_path, monkeypatch):
    seen = spy_training_steps(monkeypatch, dict_batches.StripesClassifier)
    result = certify(NormalizedStripes(), STRIPES, tmp_path)
    radius, correct = radii(tmp_path)
    assert result.complete and (correct & (radius > 0)).any()

    # dict batches in the user's space: un-normalised, each image is its clean sample plus N(0, 0.1^2) pixel noise
    clean = NormalizedStripes()
    clean.setup("fit")
    clean = clean.train_ds.pixels.flatten(1)
    for batches in seen.values():
        assert all(set(b) == {"image", "label"} for b in batches)
        pixels = torch.cat([b["image"] for b in batches]).flatten(1) * dict_batches.STD + dict_batches.MEAN
        residual = pixels - clean[torch.cdist(pixels, clean).argmin(dim=1)]
        assert 0.08 < residual.std() < 0.12 and residual.mean().abs() < 0.02


def test_unstated_normalization_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="outside \\[0, 1\\].*never clamps.*normalization="):
        certify(dict_batches.StripesDataModule(), STRIPES, tmp_path)


def test_dpa_trains_each_model_on_its_partition_in_the_users_form(tmp_path, monkeypatch):
    seen = spy_training_steps(monkeypatch, torchvision_style.LitClassifier)
    result = certify(torchvision_style.CIFARDataModule(), LIT, tmp_path, mode="dpa", smoothing=None, num_models=5,
                     training=TrainingOptions(max_epochs=1, accelerator="cpu"))
    assert result.complete and result.summary["num_partitions"] == 5
    sizes = result.summary["partition_sizes"]
    seen_sizes = sorted(sum(len(b[1]) for b in batches) for batches in seen.values())  # one epoch each
    assert len(seen_sizes) == 5 and sum(seen_sizes) == 48
    assert seen_sizes[0] == sizes["min"] and seen_sizes[-1] == sizes["max"]
    assert result.votes.shape == (5, 16)


def test_imageclassifier_by_class_path_is_the_imageclassifier_path(tmp_path):
    model = {"backbone": "small_cnn", "backbone_kwargs": {"width": 4}, "crop_padding": 1, "flip": False}
    args = dict(smoothing=GAUSS, num_models=2, n0=1, num_test_points=10, progress_bar=False,
                training=TrainingOptions(max_epochs=1, limit_train_batches=1, accelerator="cpu"))
    plain = run_certification(DigitsDataModule(image_size=8), model=model, output_dir=tmp_path / "a", **args)
    named = run_certification(DigitsDataModule(image_size=8), output_dir=tmp_path / "b", **args,
                              model={"class_path": "lightning_defense.models.ImageClassifier", "init_args": model})
    assert np.array_equal(plain.votes, named.votes)
    assert (tmp_path / "a" / "votes" / "key.json").read_bytes() == (tmp_path / "b" / "votes" / "key.json").read_bytes()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(model={"class_path": "subprocess.Popen"}), "not a LightningModule"),
        (dict(model={**LIT, "init_args": {"depth": 3}}), r"\['depth'\] are not arguments of LitClassifier"),
        (dict(training=TrainingOptions(models_per_batch=2)), "only ImageClassifier and FastImageClassifier models train several at once"),
        (dict(num_classes=4, mode="dpa", smoothing=None, num_models=1,
              training=TrainingOptions(max_epochs=1, accelerator="cpu")), r"\(batch, num_classes=4\)"),
    ],
)
def test_user_model_errors(tmp_path, kwargs, match):
    args = {"model": LIT, **kwargs}
    with pytest.raises(ValueError, match=match):
        certify(torchvision_style.CIFARDataModule(), out=tmp_path, **args)


def test_num_classes_is_for_user_models(tmp_path):
    with pytest.raises(ValueError, match="num_classes is for a user's LightningModule"):
        run_certification(DigitsDataModule(image_size=8), model={}, num_classes=10, output_dir=tmp_path)

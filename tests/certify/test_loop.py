import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.stats import beta, norm

import lightning_defense.certify.loop as loop
from lightning_defense.certify import (
    TrainingOptions,
    VoteStore,
    build_model,
    dpa_certificate_batch,
    dpa_partition,
    rab_test_noise,
    run_certification,
    train_and_vote,
)
from lightning_defense.certify.training import TEST_NOISE
from lightning_defense.cli import main
from lightning_defense.core.rng import per_sample_normal, seed_for
from lightning_defense.core.store import DIGEST_SUFFIX, CorruptStoreError, file_digest
from lightning_defense.datamodules import DigitsDataModule, GaussianNoiseDataModule
from lightning_defense.models import FastImageClassifier, ImageClassifier

ROOT = Path(__file__).resolve().parents[2]
MODEL = {"backbone": "small_cnn", "backbone_kwargs": {"width": 4}, "lr": 0.05, "crop_padding": 1, "flip": False}
GAUSS = {"class_path": "lightning_defense.datamodules.GaussianNoiseDataModule", "init_args": {"sigma": 0.25}}
TINY = TrainingOptions(max_epochs=1, limit_train_batches=2, accelerator="cpu")


def tiny_run(out, batch_size=32, **kwargs):
    args = dict(model=MODEL, smoothing=GAUSS, num_models=4, n0=1, num_test_points=30, training=TINY,
                output_dir=out, progress_bar=False)
    args.update(kwargs)
    return run_certification(DigitsDataModule(image_size=8, batch_size=batch_size), **args)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_smoothing_end_to_end_on_digits(tmp_path):
    result = tiny_run(tmp_path, training=TrainingOptions(max_epochs=2, accelerator="cpu", models_per_batch=2),
                      num_test_points=60, batch_size=64, model={**MODEL, "lr": 0.1, "milestones": []})
    assert result.complete and result.trained == [0, 1, 2, 3]
    votes, labels = result.votes, np.array([int(r["label"]) for r in read_csv(tmp_path / "certificates.csv")])
    assert votes.shape == (4, 60)
    # the vmap-trained models are real classifiers: well above the 10% of chance on the digits
    assert result.summary["mean_model_accuracy"] > 0.4
    assert np.mean(votes == labels) == pytest.approx(result.summary["mean_model_accuracy"])

    # CERTIFY recomputed independently: model 0 selects, models 1..3 estimate pA (scipy's beta quantile)
    rows = read_csv(tmp_path / "certificates.csv")
    assert list(rows[0]) == ["index", "label", "prediction", "pA", "radius", "correct"]
    assert [int(r["index"]) for r in rows] == list(range(60))
    for t, row in enumerate(rows):
        c_hat = votes[0, t]
        k = int(np.sum(votes[1:, t] == c_hat))
        p_a = beta.ppf(0.001, k, 3 - k + 1) if k > 0 else 0.0
        assert float(row["pA"]) == pytest.approx(p_a)
        certified = p_a >= 0.5
        assert int(row["prediction"]) == (c_hat if certified else -1)
        assert float(row["radius"]) == pytest.approx(0.25 * norm.ppf(p_a) if certified else 0.0)
        assert int(row["correct"]) == int(int(row["prediction"]) == int(row["label"]))

    curve = read_csv(tmp_path / "certified_accuracy.csv")
    radii = np.array([float(r["radius"]) for r in rows])
    correct = np.array([int(r["correct"]) for r in rows], dtype=bool)
    for point in curve[::40]:
        r = float(point["radius"])
        assert float(point["certified_accuracy"]) == pytest.approx(np.mean(correct & (radii >= r)))
    assert (tmp_path / "certified_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n0"] == 1 and summary["n"] == 3 and summary["selection"] == "split"


def test_selection_all_uses_every_model_for_both(tmp_path):
    first = tiny_run(tmp_path)
    again = tiny_run(tmp_path, selection="all")  # same votes (nothing retrained), other statistics
    assert again.trained == [] and np.array_equal(first.votes, again.votes)
    assert again.summary["n"] == 4 and again.summary["n0"] == 4
    rows = read_csv(tmp_path / "certificates.csv")
    for t, row in enumerate(rows):
        counts = np.bincount(first.votes[:, t], minlength=10)
        k = counts.max()
        assert float(row["pA"]) == pytest.approx(beta.ppf(0.001, k, 4 - k + 1))


def noised_training_sets(dm, draws, sigma=0.25):
    data = []
    for i in draws:
        wrapper = GaussianNoiseDataModule(dm, sigma=sigma, seed=i)
        wrapper.setup("fit")
        data.append(wrapper.train_set.tensors())
    return data


def group_and_alone(recipe, stacking, test_sigma=None, limit_train_batches=4, dtype=torch.float32):
    """The votes on 50 digits of models 0 and 1 trained as one group, and trained one at a time (one epoch)."""
    dm = DigitsDataModule(image_size=8, batch_size=32)
    dm.setup("fit")
    test_images = dm.test_set.tensors()[0][:50].to(dtype)
    data = [(images.to(dtype), labels) for images, labels in noised_training_sets(dm, (0, 1))]
    kwargs = dict(seed=3, max_epochs=1, batch_size=32, limit_train_batches=limit_train_batches,
                  device=torch.device("cpu"), test_sigma=test_sigma,
                  test_keys=None if test_sigma is None else np.arange(50))
    build = lambda i: build_model(recipe, 10, 1, 3, i).to(dtype)  # noqa: E731
    together = train_and_vote([build(i) for i in (0, 1)], [0, 1], data, test_images, together=True, stacking=stacking,
                              **kwargs)
    alone = torch.cat([train_and_vote([build(i)], [i], [data[i]], test_images, together=False, **kwargs)
                       for i in (0, 1)])
    return together, alone


@pytest.mark.parametrize("stacking", ["layers", "vmap"])
@pytest.mark.parametrize("test_sigma", [None, 0.25], ids=["clean-test-inputs", "rab-test-noise"])
def test_a_group_trains_the_same_models_as_one_at_a_time(test_sigma, stacking):
    together, alone = group_and_alone((ImageClassifier, MODEL), stacking, test_sigma)
    assert together.shape == (2, 50)
    assert torch.equal(together, alone)
    assert not torch.equal(alone[0], alone[1])  # different draws and seeds give different models


def test_a_group_of_airbench_models_trains_stacked_as_one_at_a_time():
    """The fast recipe's network (airbench94's) stacks too: its fixed whitening stem and BatchNorm scales stay fixed."""
    from lightning_defense.models.grouped import can_stack

    model = dict(MODEL, backbone="airbench", backbone_kwargs={"widths": [8, 16, 16]}, lr=2.0)  # its head is scaled by 1/9
    assert can_stack(build_model((ImageClassifier, model), 10, 1, 3, 0).backbone)  # stacking="auto" stacks its layers
    together, alone = group_and_alone((ImageClassifier, model), "layers")
    assert (together == alone).float().mean() >= 0.98  # float sums in another order may flip a close vote
    assert not torch.equal(alone[0], alone[1]) and len(alone.unique()) >= 4  # models that learned, not one class


FAST = (FastImageClassifier, dict(MODEL, backbone="airbench", backbone_kwargs={"widths": [16, 32, 32]}, lr=0.8,
                                  tta="translate"))


@pytest.mark.parametrize("stacking", ["layers", "vmap"])
def test_a_group_of_fast_recipe_models_trains_as_one_at_a_time(stacking, monkeypatch):
    """The fast recipe trains in groups too: each model whitens from its own first batch, then the group trains with
    label smoothing, BatchNorm biases at bias_scaler x lr, lookahead and the per-step schedule, and votes with
    test-time augmentation."""
    firsts, schedules = [], []
    initialise, optimize = FastImageClassifier.initialise_from_batch, FastImageClassifier.optimizer_and_schedule

    def spy_initialise(self, x):
        firsts.append(x.clone())
        initialise(self, x)
        assert bool(self.backbone.whitened)

    def spy_optimize(self, *args, **kwargs):
        schedules.append(optimize(self, *args, **kwargs))
        return schedules[-1]

    monkeypatch.setattr(FastImageClassifier, "initialise_from_batch", spy_initialise)
    monkeypatch.setattr(FastImageClassifier, "optimizer_and_schedule", spy_optimize)
    # a whole epoch (40 steps) in float64: in float32 a group's sums in another order flip votes once rounding
    # differences grow over training; in float64 the votes are the same
    together, alone = group_and_alone(FAST, stacking, limit_train_batches=None, dtype=torch.float64)
    assert torch.equal(together, alone)
    dm = DigitsDataModule(image_size=8)
    dm.setup("fit")
    accuracy = (alone == dm.test_set.tensors()[1][:50]).float().mean(1)
    assert not torch.equal(alone[0], alone[1]) and accuracy.min() > 0.3, accuracy  # models that learned (chance: 0.1)
    # models 0 and 1 whiten from their own first batches, the same in the group as alone
    assert len(firsts) == 4 and torch.equal(firsts[0], firsts[2]) and torch.equal(firsts[1], firsts[3])
    assert not torch.equal(firsts[0], firsts[1])
    # the schedule steps per optimizer step to the end (1 epoch of 40 batches), where lookahead syncs a last time
    grouped_biases = {len(g["params"]) for g in schedules[0][0].param_groups}
    for optimizer, scheduler, interval in schedules:
        assert interval == "step" and scheduler.last_epoch == 40
        assert [g["lookahead_step"] for g in optimizer.param_groups] == [40, 40]
        assert optimizer.param_groups[1]["lr"] == pytest.approx(64 * optimizer.param_groups[0]["lr"])
        assert {len(g["params"]) for g in optimizer.param_groups} == grouped_biases  # BatchNorm biases found stacked too


def test_a_last_batch_of_one_image_joins_the_batch_before_it(monkeypatch):
    """65 images in batches of 32: two steps of 32 and 33 images. A batch of one would give the airbench network's
    BatchNorm one value per channel at its 1x1 last block (a DPA partition can have any size)."""
    sizes = []
    criterion = FastImageClassifier.criterion
    monkeypatch.setattr(FastImageClassifier, "criterion", lambda self, logits, y, **kw: (
        sizes.append(len(y)), criterion(self, logits, y, **kw))[1])
    dm = DigitsDataModule(image_size=8, batch_size=32)
    dm.setup("fit")
    images, labels = dm.train_set.tensors()
    votes = train_and_vote([build_model(FAST, 10, 1, 3, 0)], [0], [(images[:65], labels[:65])], images[:10], seed=3,
                           max_epochs=2, batch_size=32, limit_train_batches=None, device=torch.device("cpu"),
                           together=False)
    assert sizes == [32, 33, 32, 33] and votes.shape == (1, 10)


def test_rab_test_noise_is_each_models_own_draw_keyed_by_test_index():
    """RAB: model i votes on x_t + sigma * N(0, I), the draw keyed by (seed, i, TEST_NOISE) and test index t."""
    dm = DigitsDataModule(image_size=8, batch_size=32)
    dm.setup("fit")
    keys = np.array([7, 3, 120, 41, 5, 99, 0, 64])
    clean = dm.test_set.tensors()[0][keys]
    data = noised_training_sets(dm, (2, 5))
    kwargs = dict(seed=3, max_epochs=1, batch_size=32, limit_train_batches=3, device=torch.device("cpu"))
    build = lambda: [build_model((ImageClassifier, MODEL), 10, 1, 3, i) for i in (2, 5)]  # noqa: E731
    rab = train_and_vote(build(), [2, 5], data, clean, together=True, test_sigma=0.6, test_keys=keys, **kwargs)
    for row, i in enumerate((2, 5)):
        noise = per_sample_normal(seed_for(3, i, TEST_NOISE), torch.as_tensor(keys), (1, 8, 8))
        assert torch.equal(rab_test_noise(3, i, keys, (1, 8, 8)), noise)
        by_hand = train_and_vote([build_model((ImageClassifier, MODEL), 10, 1, 3, i)], [i], [data[row]], clean + 0.6 * noise,
                                 together=False, **kwargs)
        assert torch.equal(rab[row], by_hand[0])
    # a point's noise depends on its test index, not on its position or on the other points certified
    order = np.array([4, 0, 6])
    subset = train_and_vote(build(), [2, 5], data, clean[order], together=True, test_sigma=0.6, test_keys=keys[order],
                            **kwargs)
    assert torch.equal(subset, rab[:, order])
    plain = train_and_vote(build(), [2, 5], data, clean, together=True, **kwargs)
    assert not torch.equal(plain, rab)  # the test-time noise is really there
    with pytest.raises(ValueError, match="test_sigma needs test_keys"):
        train_and_vote(build(), [2, 5], data, clean, together=True, test_sigma=0.6, **kwargs)


# Enough models that a certificate can be nonzero: n = 18 unanimous votes give pA = 0.01^(1/18) = 0.77.
# 3 epochs of a width-4 CNN, all 20 models at once with vmap (a few seconds of CPU).
NONZERO = dict(num_models=20, n0=2, alpha=0.01, num_test_points=60, batch_size=32,
               model={**MODEL, "lr": 0.1, "milestones": []},
               training=TrainingOptions(max_epochs=3, accelerator="cpu", models_per_batch=20))


def independent_certificate(mode, votes, n0, sigma, alpha, num_classes=10):
    """Certificate per test point from the stored votes, with scipy's beta/norm quantiles."""
    rows = []
    for t in range(votes.shape[1]):
        c_hat = int(np.argmax(np.bincount(votes[:n0, t], minlength=num_classes)))  # ties: smaller class
        counts = np.bincount(votes[n0:, t], minlength=num_classes)
        n = int(counts.sum())
        if mode == "smoothing":  # Cohen's CERTIFY: one-sided Clopper-Pearson pA, radius sigma * Phi^-1(pA)
            k = counts[c_hat]
            p_a = beta.ppf(alpha, k, n - k + 1) if k > 0 else 0.0
            rows.append((c_hat, p_a, sigma * norm.ppf(p_a)) if p_a >= 0.5 else (-1, p_a, 0.0))
        else:  # RAB: pA lower and every other class's upper bound at alpha / K; radius sigma/2 (Phi^-1 pA - Phi^-1 pB)
            level = alpha / num_classes
            k = counts[c_hat]
            p_a = beta.ppf(level, k, n - k + 1) if k > 0 else 0.0
            uppers = [beta.ppf(1 - level, c + 1, n - c) if c < n else 1.0
                      for j, c in enumerate(counts) if j != c_hat]
            p_b = min(1 - p_a, max(uppers))
            rows.append((c_hat, p_a, p_b, sigma / 2 * (norm.ppf(p_a) - norm.ppf(p_b))) if p_a > p_b
                        else (-1, p_a, p_b, 0.0))
    return rows


@pytest.mark.parametrize("mode", ["smoothing", "rab"])
def test_loop_certifies_a_nonzero_radius_checked_independently(tmp_path, mode):
    result = tiny_run(tmp_path, mode=mode, **NONZERO)
    assert result.complete and result.votes.shape == (20, 60)
    rows = read_csv(tmp_path / "certificates.csv")
    expected = independent_certificate(mode, result.votes, n0=2, sigma=0.25, alpha=0.01)
    assert list(rows[0]) == ["index", "label", "prediction", "pA", *(["pB"] if mode == "rab" else []), "radius",
                             "correct"]
    for row, want in zip(rows, expected):
        assert int(row["prediction"]) == want[0]
        assert float(row["pA"]) == pytest.approx(want[1], abs=1e-9)
        if mode == "rab":
            assert float(row["pB"]) == pytest.approx(want[2], abs=1e-9)
        assert float(row["radius"]) == pytest.approx(want[-1], abs=1e-9)
    radii = np.array([float(r["radius"]) for r in rows])
    correct = np.array([int(r["correct"]) for r in rows], dtype=bool)
    assert np.any(correct & (radii > 0.05)), "no test point was certified at a nonzero radius"
    assert result.summary["certified_accuracy"]["0.1"] == pytest.approx(np.mean(correct & (radii >= 0.1)))
    assert result.summary["mode"] == mode and ("joint perturbation of the test input" in result.summary["certifies"]) == (mode == "rab")
    unanimous = independent_certificate(mode, np.array([[0]] * 20), n0=2, sigma=0.25, alpha=0.01)[0][-1]
    assert result.summary["max_certifiable_radius"] == pytest.approx(unanimous)
    assert radii.max() <= unanimous + 1e-12


def test_rab_loop_keys_test_noise_by_test_index(tmp_path):
    first = tiny_run(tmp_path / "a", mode="rab", num_test_points=12)
    picked = tiny_run(tmp_path / "b", mode="rab", num_test_points=None, test_indices=[9, 2, 11])
    assert np.array_equal(picked.votes, first.votes[:, [9, 2, 11]])
    smoothing = tiny_run(tmp_path / "c", num_test_points=12)  # same models, clean test inputs
    assert not np.array_equal(smoothing.votes, first.votes)


def test_resume_after_interruption_retrains_nothing(tmp_path, monkeypatch):
    partial = tiny_run(tmp_path, max_models=2)
    assert not partial.complete and partial.trained == [0, 1] and partial.summary == {}
    assert not (tmp_path / "certificates.csv").exists()
    stamps = {i: os.stat(tmp_path / "votes" / f"model_{i:06d}.npy").st_mtime_ns for i in (0, 1)}

    # a crash while training model 3: model 2's votes are kept, no temporary file is left behind
    real, calls, crash_on = loop.train_and_vote, [], {3}

    def crash_on_model_3(models, indices, *args, **kwargs):
        calls.append(list(indices))
        if crash_on & set(indices):
            raise RuntimeError("simulated crash")
        return real(models, indices, *args, **kwargs)

    monkeypatch.setattr(loop, "train_and_vote", crash_on_model_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny_run(tmp_path)
    assert calls == [[2], [3]]
    assert sorted(p.name for p in (tmp_path / "votes").iterdir()) == [
        "key.json", "model_000000.npy", "model_000000.npy.sha256", "model_000001.npy", "model_000001.npy.sha256",
        "model_000002.npy", "model_000002.npy.sha256"]

    calls.clear()
    crash_on.clear()
    done = tiny_run(tmp_path)
    assert done.complete and done.trained == [3] and calls == [[3]]
    assert {i: os.stat(tmp_path / "votes" / f"model_{i:06d}.npy").st_mtime_ns for i in (0, 1)} == stamps
    assert len(read_csv(tmp_path / "certificates.csv")) == 30

    grown = tiny_run(tmp_path, num_models=5)  # a larger m reuses the models already trained
    assert grown.trained == [4] and np.array_equal(grown.votes[:4], done.votes)

    with pytest.raises(ValueError, match="different configuration.*training"):
        tiny_run(tmp_path, training=TrainingOptions(max_epochs=2, limit_train_batches=2, accelerator="cpu"))


def test_vote_store_rejects_bad_files(tmp_path):
    store = VoteStore(tmp_path, {"a": 1}, num_test_points=3, num_classes=10)
    store.save(0, np.array([1, 2, 3]))
    store.records.save_array(store.name(1), np.array([1, 2, 30]))  # digest matches, votes out of range
    with pytest.raises(CorruptStoreError, match=r"model 1 .*model_000001\.npy must be classes in \[0, 10\)"):
        store.load([0, 1])
    with pytest.warns(UserWarning, match=r"model_000001\.npy must be classes"):
        assert store.done(2) == [0]  # reported, removed, and so trained again
    assert not store.path(1).exists()
    with pytest.raises(ValueError, match="3 integers"):
        store.save(2, np.array([1, 2]))
    with pytest.raises(FileNotFoundError, match="model 5"):
        store.load([5])


def flip_a_vote(path):
    """Changes one stored vote to another class: still a valid .npy with votes in range, but not its digest."""
    votes, raw = np.load(path), bytearray(path.read_bytes())
    first = len(raw) - votes.nbytes  # the little-endian int64 data ends the file
    raw[first] = (raw[first] + 1) % 10
    path.write_bytes(bytes(raw))
    damaged = np.load(path)
    assert 0 <= damaged.min() and damaged.max() < 10 and not np.array_equal(damaged, votes)


def truncate(path):
    path.write_bytes(path.read_bytes()[:-8])


def truncate_and_rehash(path):
    """A truncated file whose digest was (wrongly) written for the truncated bytes: unreadable as .npy."""
    truncate(path)
    path.with_name(path.name + DIGEST_SUFFIX).write_text(file_digest(path))


@pytest.mark.parametrize("damage", [flip_a_vote, truncate, truncate_and_rehash])
def test_damaged_votes_file_is_reported_and_retrained(tmp_path, damage):
    clean = tiny_run(tmp_path)
    certificates = (tmp_path / "certificates.csv").read_text()
    damage(tmp_path / "votes" / "model_000002.npy")

    key = json.loads((tmp_path / "votes" / "key.json").read_text())
    store = VoteStore(tmp_path / "votes", key, num_test_points=30, num_classes=10)
    with pytest.raises(CorruptStoreError, match=r"model_000002\.npy"):
        store.load([0, 1, 2, 3])

    with pytest.warns(UserWarning, match=r"model_000002\.npy.*model 2 will be trained again"):
        again = tiny_run(tmp_path)
    assert again.complete and again.trained == [2]
    assert np.array_equal(again.votes, clean.votes)
    assert (tmp_path / "certificates.csv").read_text() == certificates


def test_dpa_end_to_end_on_digits(tmp_path, monkeypatch):
    plots = []
    real_plot = loop.plot_certified_accuracy
    monkeypatch.setattr(loop, "plot_certified_accuracy", lambda *a, **kw: plots.append(kw) or real_plot(*a, **kw))
    result = tiny_run(tmp_path, mode="dpa", smoothing=None, num_models=7, report_radii=[0, 1, 2, 3],
                      model={**MODEL, "lr": 0.1, "milestones": []},
                      training=TrainingOptions(max_epochs=4, accelerator="cpu", models_per_batch=2))
    assert result.complete and result.votes.shape == (7, 30)
    rows = read_csv(tmp_path / "certificates.csv")
    assert list(rows[0]) == ["index", "label", "prediction", "certified_insertions_deletions",
                             "certified_modified_samples", "correct"]
    prediction, size = dpa_certificate_batch(torch.from_numpy(result.votes.T.copy()), 10)
    assert [int(r["prediction"]) for r in rows] == prediction.tolist()
    assert [int(r["certified_insertions_deletions"]) for r in rows] == size.tolist()
    # a clean-label poison is one deletion plus one insertion: half the certified size, rounded down
    assert [int(r["certified_modified_samples"]) for r in rows] == (size // 2).tolist()
    assert (size > size // 2).any(), "the test needs a certificate that differs between the units"
    dm = DigitsDataModule(image_size=8)
    dm.setup("fit")
    sizes = torch.bincount(dpa_partition(dm.train_set.tensors()[0], 7), minlength=7)
    assert result.summary["partition_sizes"] == {"min": int(sizes.min()), "max": int(sizes.max())}
    correct = np.array([int(r["correct"]) for r in rows], dtype=bool)
    marked = np.sort(np.where(correct, size.numpy(), -1))
    assert result.summary["median_certified_insertions_deletions"] == marked[len(marked) // 2]
    marked_modified = np.sort(np.where(correct, size.numpy() // 2, -1))
    assert result.summary["median_certified_modified_samples"] == marked_modified[len(marked) // 2]
    for s in range(4):
        assert result.summary["certified_accuracy_insertions_deletions"][str(s)] == np.mean(correct & (size.numpy() >= s))
        assert result.summary["certified_accuracy_modified_samples"][str(s)] == np.mean(correct & (size.numpy() >= 2 * s))
    assert "certified_accuracy" not in result.summary and "insertion" in result.summary["certifies"]
    curve = read_csv(tmp_path / "certified_accuracy.csv")
    assert list(curve[0]) == ["certified_modified_samples", "certified_insertions_deletions", "certified_accuracy"]
    for point in curve:
        r = int(point["certified_modified_samples"])
        assert int(point["certified_insertions_deletions"]) == 2 * r
        assert float(point["certified_accuracy"]) == pytest.approx(np.mean(correct & (size.numpy() >= 2 * r)))
    assert int(curve[-1]["certified_modified_samples"]) == size.max() // 2 + 1
    assert plots[-1]["xlabel"] == "modified training samples (clean-label poisons)"
    assert plots[-1]["secondary_xaxis"] == ("training samples inserted + deleted, |T (-) U|", 2.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n0=4), "n0 must be < num_models"),
        (dict(selection="first"), "selection must be one of"),
        (dict(mode="bagging"), "mode must be one of"),
        (dict(smoothing={"class_path": "no_such_module.Noise"}),
         "smoothing.class_path: cannot import class_path 'no_such_module.Noise'"),
        (dict(smoothing={"class_path": "lightning_defense.datamodules.Nope"}),
         "cannot import class_path 'lightning_defense.datamodules.Nope'.*has no attribute 'Nope'"),
        (dict(smoothing={"class_path": "lightning_defense.models.ImageClassifier"}), "not a LightningDataModule"),
        (dict(smoothing={"class_path": "lightning_defense.datamodules.DigitsDataModule"}), "must accept base="),
        (dict(smoothing={"class_path": "GaussianNoiseDataModule", "init_args": {"seed": 3, "sigma": 0.5}}),
         "must not set 'seed'"),
        (dict(smoothing={"class_path": "GaussianNoiseDataModule", "init_args": {"sigma": 0.5, "eps": 1}}),
         r"\['eps'\] are not arguments of GaussianNoiseDataModule"),
        (dict(smoothing={"class_path": "GaussianNoiseDataModule"}), "sigma is needed"),
        (dict(smoothing=GAUSS, sigma=0.5), "disagrees"),
        (dict(mode="dpa"), "set smoothing to null"),
        (dict(num_test_points=5, test_indices=[1, 2]), "not both"),
        (dict(training=TrainingOptions(models_per_batch=0)), "models_per_batch must be an integer >= 1"),
        (dict(model={**MODEL, "num_classes": 3}), "model.num_classes comes from the datamodule"),
    ],
)
def test_argument_errors(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_run(tmp_path, **kwargs)


def test_bad_test_indices(tmp_path):
    with pytest.raises(ValueError, match=r"test_indices must be distinct indices in \[0, 359\)"):
        tiny_run(tmp_path, num_test_points=None, test_indices=[0, 400])


CLI_TINY = [
    "--num_models=3", "--n0=1", "--num_test_points=20", "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
    "--data.init_args.image_size=8", "--model.backbone_kwargs={width: 4}", "--progress_bar=false",
]


def test_cli_sigma_grid_and_certify_plot(tmp_path, capsys):
    config = ROOT / "configs" / "digits" / "certify.yaml"
    main(["certify", "--config", str(config), *CLI_TINY, f"--output_dir={tmp_path}", "--sigmas=[0.25, 0.5]",
          "--trainer.models_per_batch=3"])
    out = capsys.readouterr().out
    assert "[sigma=0.25]" in out and "[sigma=0.5]" in out and "certified accuracy at radius 0:" in out
    for s in ("0.25", "0.5"):
        summary = json.loads((tmp_path / f"sigma_{s}" / "summary.json").read_text())
        assert summary["sigma"] == float(s) and summary["num_models"] == 3
    assert (tmp_path / "certified_accuracy.png").exists()

    main(["certify-plot", str(tmp_path / "sigma_0.25"), str(tmp_path / "sigma_0.5"), "--output", str(tmp_path / "both.png")])
    assert (tmp_path / "both.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="holds no certified_accuracy.csv"):
        main(["certify-plot", str(tmp_path), "--output", str(tmp_path / "x.png")])


def test_cli_dpa_reports_both_units_and_certify_plot_reads_them(tmp_path, capsys):
    config = ROOT / "configs" / "digits" / "certify_dpa.yaml"
    for k in (3, 5):
        main(["certify", "--config", str(config), *CLI_TINY, f"--num_models={k}", f"--output_dir={tmp_path / str(k)}"])
    out = capsys.readouterr().out
    assert "certified accuracy at training samples inserted + deleted: 0:" in out
    assert "certified accuracy at modified training samples: 0:" in out
    assert "inserted + deleted =" in out and "modified samples" in out and "poisoned samples" not in out
    main(["certify-plot", str(tmp_path / "3"), str(tmp_path / "5"), "--output", str(tmp_path / "dpa.png")])
    assert (tmp_path / "dpa.png").read_bytes()[:4] == b"\x89PNG"

    # an output of the old layout (one "poisoned_samples" column, in insertions + deletions) is not misread
    old = tmp_path / "old"
    old.mkdir()
    (old / "certified_accuracy.csv").write_text("poisoned_samples,certified_accuracy\n0,0.9\n1,0.5\n")
    with pytest.raises(SystemExit, match="columns.*poisoned_samples.*rerun `lightning-defense certify`"):
        main(["certify-plot", str(old), "--output", str(tmp_path / "x.png")])
    # modified samples and l2 radii cannot share an x-axis
    main(["certify", "--config", str(ROOT / "configs" / "digits" / "certify.yaml"), *CLI_TINY,
          f"--output_dir={tmp_path / 'smooth'}"])
    with pytest.raises(SystemExit, match="cannot share an x-axis"):
        main(["certify-plot", str(tmp_path / "3"), str(tmp_path / "smooth"), "--output", str(tmp_path / "x.png")])


def test_cli_rab_config(tmp_path, capsys):
    main(["certify", "--config", str(ROOT / "configs" / "digits" / "certify_rab.yaml"), *CLI_TINY,
          f"--output_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert "certify: RAB, sigma=0.25" in out and "joint perturbation of the test input" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == "rab" and summary["num_models"] == 3
    assert list(read_csv(tmp_path / "certificates.csv")[0]) == ["index", "label", "prediction", "pA", "pB", "radius",
                                                                 "correct"]


def test_cli_bad_wrapper_class_path_is_a_clear_error(tmp_path, capsys):
    config = ROOT / "configs" / "digits" / "certify.yaml"
    with pytest.raises(SystemExit):
        main(["certify", "--config", str(config), *CLI_TINY, f"--output_dir={tmp_path}",
              "--smoothing={class_path: my.Purifier, init_args: {sigma: 0.25}}"])
    assert "my.Purifier" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="n0 must be < num_models"):
        main(["certify", "--config", str(config), *CLI_TINY, f"--output_dir={tmp_path}", "--n0=3"])


@pytest.mark.parametrize("recipe", ["image_classifier", "fast"])
def test_two_process_cpu_ddp_gives_the_same_votes(tmp_path, recipe):
    config = ROOT / "configs" / "digits" / "certify.yaml"
    # 5 models: with 2 processes x 2 models per batch, the last round leaves rank 1 idle
    common = [*CLI_TINY, "--num_models=5", "--trainer.limit_train_batches=2"]
    if recipe == "fast":  # the fast recipe: each model whitens from its own first batch on its rank, no collective
        settings = yaml.safe_load(config.read_text())
        settings["model"] = {"class_path": "lightning_defense.models.FastImageClassifier",
                             "init_args": {"backbone_kwargs": {"widths": [4, 8, 8]}, "flip": False, "crop_padding": 1}}
        config = tmp_path / "certify_fast.yaml"
        config.write_text(yaml.safe_dump(settings))
        common = [arg for arg in common if not arg.startswith("--model.")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(["certify", "--config", str(config), *common, f"--output_dir={tmp_path / 'one'}",
              "--trainer.models_per_batch=1"])
    finally:
        torch.set_num_threads(torch_threads)
    cmd = [sys.executable, "-m", "lightning_defense.cli", "certify", "--config", str(config), *common,
           f"--output_dir={tmp_path / 'two'}", "--trainer.devices=2", "--trainer.models_per_batch=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stdout + proc.stderr
    assert proc.stdout.count("certify: sigma=0.25") == 1  # only rank 0 reports
    for i in range(5):
        one = np.load(tmp_path / "one" / "votes" / f"model_{i:06d}.npy")
        two = np.load(tmp_path / "two" / "votes" / f"model_{i:06d}.npy")
        assert np.array_equal(one, two), f"model {i} voted differently on 1 and 2 processes"
    assert (tmp_path / "one" / "certificates.csv").read_text() == (tmp_path / "two" / "certificates.csv").read_text()
    assert ("FastImageClassifier" in (tmp_path / "two" / "votes" / "key.json").read_text()) == (recipe == "fast")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
@pytest.mark.parametrize("name, shrink", [("certify_dpa", "--model.backbone_kwargs={width: 4}"),
                                          ("certify_dpa_fast", "--model.init_args.backbone_kwargs={widths: [4, 8, 8]}")])
def test_fashion_mnist_dpa_config_runs_tiny(tmp_path, capsys, name, shrink):
    """configs/fashion_mnist/certify_dpa.yaml (and its fast-recipe twin) on the real files, shrunk: its partitions
    cover the 54,000 images."""
    tiny = [arg for arg in CLI_TINY if not arg.startswith("--model.")] + [shrink]
    main(["certify", "--config", str(ROOT / "configs" / "fashion_mnist" / f"{name}.yaml"), *tiny,
          f"--output_dir={tmp_path}"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_partitions"] == 3 and summary["num_test_points"] == 20
    sizes = summary["partition_sizes"]
    assert 54_000 / 3 - 1_000 < sizes["min"] <= sizes["max"] < 54_000 / 3 + 1_000  # the hash spreads them evenly
    assert "certified accuracy at modified training samples: 0:" in capsys.readouterr().out


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
@pytest.mark.parametrize("name, shrink", [("certify", "--model.backbone_kwargs={width: 4}"),
                                          ("certify_fast", "--model.init_args.backbone_kwargs={widths: [4, 8, 8]}")])
def test_fashion_mnist_diffusion_certify_config_runs_tiny(tmp_path, capsys, caplog, name, shrink):
    """configs/fashion_mnist/certify.yaml (and its fast-recipe twin) on the real files, shrunk: each model denoises
    its own noise draw of the training subset with the shipped Fashion-MNIST DDPM, and the sigma grid gives one run
    per sigma."""
    config = ROOT / "configs" / "fashion_mnist" / f"{name}.yaml"
    main(["certify", "--config", str(config), "--num_models=3", "--n0=1", "--num_test_points=20",
          "--trainer.max_epochs=1", "--trainer.limit_train_batches=1", shrink,
          "--progress_bar=false", "--data.init_args.train_subset=100", "--sigmas=[0.1, 0.5]",
          f"--smoothing.init_args.cache_dir={tmp_path / 'cache'}", f"--output_dir={tmp_path / 'out'}"])
    assert "certified accuracy at radius 0:" in capsys.readouterr().out
    assert caplog.text.count("purifying 100 training images") == 6  # 3 draws per sigma, each its own cache
    assert "sigma=0.1 -> t*=58 of 1000" in caplog.text and "sigma=0.5 -> t*=259 of 1000" in caplog.text
    for s in ("0.1", "0.5"):
        summary = json.loads((tmp_path / "out" / f"sigma_{s}" / "summary.json").read_text())
        assert summary["sigma"] == float(s) and summary["num_models"] == 3 and summary["num_test_points"] == 20
    assert len(list((tmp_path / "cache").iterdir())) == 6
    assert (tmp_path / "out" / "certified_accuracy.png").read_bytes()[:4] == b"\x89PNG"

"""The certified radius uses the sigma the smoothing wrapper states it adds (``certified_sigma``), and the
loop's models train as ``fit`` trains them on the wrapper (its ``train_batch_transform``)."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from scipy.stats import norm

import lightning_defense.certify.loop as loop
from lightning_defense.certify import TrainingOptions, build_model, run_certification, train_and_vote
from lightning_defense.certify.training import BATCH_TRANSFORM
from lightning_defense.core.rng import generator, seed_for
from lightning_defense.datamodules import DiffusionPurifiedDataModule, DigitsDataModule, EclipseDataModule
from lightning_defense.datamodules.eclipse import compensate
from lightning_defense.diffusion import load_denoiser, sigma_at_timestep
from lightning_defense.diffusion.sparse import SparseDenoiserBuilder
from lightning_defense.models import ImageClassifier
from tests.certify.test_loop import MODEL, noised_training_sets, read_csv, tiny_run
from tests.datamodules.test_eclipse import small_digits
from tests.diffusion._tiny import save_tiny_ddpm


def eclipse_args(tmp_path, **kwargs):
    """tests/datamodules/test_eclipse.py's tiny ECLIPSE (t* = 3 of 100 steps) as smoothing init_args."""
    return {"clean_fraction": 0.1, "replication": 4, "t_star": 3, "num_train_timesteps": 100,
            "block_out_channels": [16, 32], "layers_per_block": 1, "attention_resolutions": [4], "num_heads": 2,
            "train_steps": 3, "train_batch_size": 16, "model_dir": str(tmp_path / "models"),
            "cache_dir": str(tmp_path / "purified"), "batch_size": 64, "chunk_size": 64, "progress": False,
            "device": "cpu", **kwargs}


def t_star_sigma(num_train_timesteps=100, t_star=3):
    """The pixel sigma of ECLIPSE's t* noise level, sqrt((1 - abar) / abar) / 2 at timestep t* - 1 (0-based)."""
    abar = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="squaredcos_cap_v2").alphas_cumprod
    return float(((1 - abar[t_star - 1].double()) / abar[t_star - 1].double()).sqrt()) / 2


ECLIPSE_TRAINING = TrainingOptions(max_epochs=1, limit_train_batches=2, accelerator="cpu", models_per_batch=2)


def eclipse_run(tmp_path, out, **kwargs):
    args = dict(model=MODEL, smoothing={"class_path": "EclipseDataModule", "init_args": eclipse_args(tmp_path)},
                num_models=2, n0=1, alpha=0.9, num_test_points=40, training=ECLIPSE_TRAINING,
                output_dir=tmp_path / out, progress_bar=False)
    args.update(kwargs)
    return run_certification(small_digits(), **args)


def test_eclipse_certifies_its_t_star_sigma_and_its_models_train_with_its_compensation(tmp_path, monkeypatch):
    seen = []
    original = EclipseDataModule.train_batch_transform

    def recording(self, images, gen):
        first_draw = gen.get_state().clone()
        out = original(self, images, gen)
        seen.append((self.seed, gen.initial_seed(), first_draw, images.clone(), out.clone()))
        return out

    monkeypatch.setattr(EclipseDataModule, "train_batch_transform", recording)
    result = eclipse_run(tmp_path, "together")
    assert result.complete

    # the radius' sigma is the t* noise level's, which is the sigma the purification really used
    sigma = t_star_sigma()
    assert 0 < sigma < 0.1
    assert result.summary["sigma"] == pytest.approx(sigma, rel=1e-9)
    assert result.summary["sigma_from"] == "EclipseDataModule.certified_sigma"
    purified = {}
    for i in (0, 1):
        dm = EclipseDataModule(small_digits(), seed=i, **eclipse_args(tmp_path))
        monkeypatch.setattr(SparseDenoiserBuilder, "train", lambda *a, **k: pytest.fail("retrained"))
        dm.setup("fit")
        assert dm.cache.meta["sigma"] == pytest.approx(sigma, rel=1e-9)
        assert sigma_at_timestep(dm.get_denoiser().alphas_cumprod, 2) == pytest.approx(sigma, rel=1e-9)
        purified[i] = dm.train_tensors()[0]
    rows = read_csv(tmp_path / "together" / "certificates.csv")
    certified = [r for r in rows if int(r["prediction"]) != -1]
    assert certified, "no test point certified; the radius check needs one"
    for row in certified:  # n = 1 agreeing vote at alpha = 0.9: pA = 0.9, radius sigma * Phi^-1(0.9)
        assert float(row["pA"]) == pytest.approx(0.9)
        assert float(row["radius"]) == pytest.approx(sigma * norm.ppf(0.9), rel=1e-9)

    # every batch of both models went through the compensation, each model drawing from its own keyed stream
    assert sorted(s[0] for s in seen) == [0, 0, 1, 1]  # 2 models x 2 batches
    for i in (0, 1):
        calls = [s for s in seen if s[0] == i]
        assert all(s[1] == seed_for(0, i, BATCH_TRANSFORM) for s in calls)
        _, _, state, images, out = calls[0]
        assert torch.equal(state, generator(0, i, BATCH_TRANSFORM).get_state())  # the stream's start
        assert torch.equal(out, compensate(images, 0.4, 0.05, generator(0, i, BATCH_TRANSFORM)))
        assert (out - images).abs().mean() > 0.01
        for _, _, _, images, _ in calls:  # what the hook saw: model i's purified training images, not crops
            assert (images.flatten(1)[:, None] == purified[i].flatten(1)[None]).all(2).any(1).all()

    # a vmap group of 2 gives the same votes as one model at a time
    alone = eclipse_run(tmp_path, "alone", training=TrainingOptions(max_epochs=1, limit_train_batches=2,
                                                                    accelerator="cpu", models_per_batch=1))
    assert np.array_equal(alone.votes, result.votes)


def test_eclipse_refuses_another_sigma_and_the_ablation_without_diffusion(tmp_path, monkeypatch):
    monkeypatch.setattr(SparseDenoiserBuilder, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    sigma = t_star_sigma()
    with pytest.raises(ValueError, match=rf"sigma=0.5 disagrees with the sigma EclipseDataModule certifies.*{sigma:.6g}"):
        eclipse_run(tmp_path, "out", sigma=0.5)
    with pytest.raises(ValueError, match="EclipseDataModule certifies no sigma.*certified_sigma is None"):
        eclipse_run(tmp_path, "out", smoothing={"class_path": "EclipseDataModule",
                                                "init_args": eclipse_args(tmp_path, diffusion=False)})
    assert not (tmp_path / "out").exists()
    # the paper's t* = 100 of 4000 steps is about 0.025 in [0, 1] pixels; a sigma that agrees is accepted
    paper = loop.resolve_smoothing({"class_path": "EclipseDataModule", "init_args": {}}, None, DigitsDataModule())
    assert paper[0] is EclipseDataModule and paper[2] == pytest.approx(t_star_sigma(4000, 100)) and 0.02 < paper[2] < 0.03
    assert loop.resolve_smoothing({"class_path": "EclipseDataModule"}, paper[2], DigitsDataModule())[2] == paper[2]


@pytest.mark.parametrize("class_path", ["DeepKNNFilterDataModule", "ShortcutSqueezeDataModule"])
def test_a_wrapper_that_certifies_no_sigma_is_refused(tmp_path, class_path):
    with pytest.raises(ValueError, match=rf"smoothing.class_path {class_path} certifies no sigma \(it has no "
                                         r"certified_sigma\).*Wrappers that do.*: DiffusionPurifiedDataModule, "
                                         r"EclipseDataModule, GaussianNoiseDataModule"):
        tiny_run(tmp_path, smoothing={"class_path": class_path}, sigma=0.25)
    assert not (tmp_path / "votes").exists()


def test_diffusion_purified_with_a_timestep_certifies_that_timesteps_sigma(tmp_path):
    ddpm = save_tiny_ddpm(tmp_path / "ddpm")
    init_args = {"denoiser": ddpm, "sigma": None, "timestep": 10, "cache_dir": str(tmp_path / "cache"),
                 "batch_size": 64, "chunk_size": 64, "progress": False}
    smoothing = {"class_path": "DiffusionPurifiedDataModule", "init_args": init_args}
    sigma = sigma_at_timestep(load_denoiser(ddpm).alphas_cumprod, 10)
    result = tiny_run(tmp_path / "out", smoothing=smoothing, num_models=2)
    assert result.summary["sigma"] == pytest.approx(sigma, rel=1e-12)
    assert result.summary["sigma_from"] == "DiffusionPurifiedDataModule.certified_sigma"
    # the purification has no per-batch rewrite: each model's votes are plain training on its purified set
    dm = DigitsDataModule(image_size=8, batch_size=32)
    dm.setup("fit")
    test_images = dm.test_set.tensors()[0][:30]
    for i in (0, 1):
        wrapper = DiffusionPurifiedDataModule(DigitsDataModule(image_size=8, batch_size=32), seed=i, **init_args)
        wrapper.setup("fit")
        votes = train_and_vote([build_model((ImageClassifier, MODEL), 10, 1, 0, i)], [i], [wrapper.train_tensors()], test_images,
                               seed=0, max_epochs=1, batch_size=32, limit_train_batches=2,
                               device=torch.device("cpu"), together=False)
        assert np.array_equal(votes[0].numpy(), result.votes[i])
    with pytest.raises(ValueError, match=rf"sigma=0.5 disagrees.*{sigma:.6g}"):
        tiny_run(tmp_path / "other", smoothing=smoothing, num_models=2, sigma=0.5)
    # with sigma, it certifies that sigma (given beside the wrapper, it is injected as the wrapper's)
    given = loop.resolve_smoothing({"class_path": "DiffusionPurifiedDataModule", "init_args": {"denoiser": ddpm}},
                                   0.3, DigitsDataModule())
    assert given[1]["sigma"] == 0.3 and given[2] == 0.3


def test_vmap_group_with_a_batch_transform_trains_the_same_models_as_one_at_a_time():
    dm = DigitsDataModule(image_size=8, batch_size=32)
    dm.setup("fit")
    test_images = dm.test_set.tensors()[0][:50]
    data = noised_training_sets(dm, (0, 1))
    noise = lambda x, g: compensate(x, 0.0, 0.2, g)  # noqa: E731
    kwargs = dict(seed=3, max_epochs=1, batch_size=32, limit_train_batches=4, device=torch.device("cpu"))
    build = lambda i: build_model((ImageClassifier, MODEL), 10, 1, 3, i)  # noqa: E731
    together = train_and_vote([build(0), build(1)], [0, 1], data, test_images, together=True,
                              batch_transforms=[noise, noise], **kwargs)
    alone = torch.cat([train_and_vote([build(i)], [i], [data[i]], test_images, together=False,
                                      batch_transforms=[noise], **kwargs) for i in (0, 1)])
    assert torch.equal(together, alone)
    plain = train_and_vote([build(0), build(1)], [0, 1], data, test_images, together=True, **kwargs)
    assert not torch.equal(plain, together)  # the transform is really applied
    identity = train_and_vote([build(0), build(1)], [0, 1], data, test_images, together=True,
                              batch_transforms=[lambda x, g: x, None], **kwargs)
    assert torch.equal(plain, identity)
    with pytest.raises(ValueError, match="one entry per model"):
        train_and_vote([build(0)], [0], data[:1], test_images, together=False, batch_transforms=[], **kwargs)

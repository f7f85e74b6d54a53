"""The fast recipe: whitening, label smoothing, lookahead, the per-step schedule, TTA, determinism, resume,
certification through the plain loop, and its configs."""

import csv
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_defense.certify import TrainingOptions, run_certification
from lightning_defense.cli import build_cli
from lightning_defense.datamodules import DigitsDataModule
from lightning_defense.models import AirbenchNet, FastImageClassifier, ImageClassifier, Lookahead, build_backbone
from lightning_defense.models.airbench import image_patches, whitening_filters
from lightning_defense.models.fast import WarmupLinearDecay, tta_logits
from tests.datamodules.test_cifar10 import make_archive

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)` but the `self.trainer`")
TINY = {"widths": [8, 16, 16]}
EPOCHS, CRASH_EPOCH = 3, 2


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster, and on a shared machine much faster than two spinning ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smooth_images(n=16, channels=3, side=12, seed=0):
    """Images with strongly correlated neighbouring pixels: their patches are far from white."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, side + 3, side + 3, generator=gen)
    return F.avg_pool2d(x, 4, stride=1)  # (n, channels, side, side)


def tiny_model(**kwargs):
    args = dict(num_classes=10, in_chans=1, backbone_kwargs=TINY, flip=False, crop_padding=1, tta="translate",
                lr=0.2)
    return FastImageClassifier(**{**args, **kwargs})


def tiny_digits():
    return DigitsDataModule(image_size=8, val_fraction=0.05, test_fraction=0.85, batch_size=32, seed=0)


def trainer(root, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, max_epochs=EPOCHS, limit_val_batches=0, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root))
    return L.Trainer(**{**defaults, **kwargs})


def weights(model):
    return torch.cat([t.detach().flatten().float() for t in model.state_dict().values()])


# --------------------------------------------------------------------------- whitening


def test_the_stem_whitens_the_patches_of_its_init_batch():
    images = smooth_images()
    patches = image_patches(images, 2)
    raw = patches.T @ patches / len(patches)
    assert (raw - torch.eye(12)).abs().max() > 0.1  # far from white before

    net = AirbenchNet(num_classes=10, in_chans=3, widths=(8, 8), whiten_eps=1e-9)
    net.init_whitening(images)
    assert bool(net.whitened)
    out = F.conv2d(images, net.stem.weight)  # (n, 24, 11, 11), without the bias
    first, second = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12), out[:, 12:].permute(0, 2, 3, 1).reshape(-1, 12)
    moment = first.T.double() @ first.double() / len(first)
    torch.testing.assert_close(moment, torch.eye(12, dtype=torch.float64), atol=2e-3, rtol=0)
    assert torch.equal(second, -first)  # each filter and its negative

    # with airbench's eps the moment is diag(lambda / (lambda + eps)), the eigenvalues of the raw moment
    net = AirbenchNet(num_classes=10, in_chans=3, widths=(8, 8), whiten_eps=5e-3)
    net.init_whitening(images)
    first = F.conv2d(images, net.stem.weight[:12]).permute(0, 2, 3, 1).reshape(-1, 12).double()
    lam = torch.linalg.eigvalsh(raw.double()).flip(0)
    torch.testing.assert_close(torch.diagonal(first.T @ first / len(first)), lam / (lam + 5e-3), atol=2e-3, rtol=0)


def test_the_first_training_batch_whitens_once_and_the_buffer_remembers():
    model = tiny_model(in_chans=3, total_steps=4, crop_padding=0)
    first, second = smooth_images(8, seed=1), smooth_images(8, seed=2)
    labels = torch.arange(8) % 10
    assert not bool(model.backbone.whitened)
    model.training_step((first, labels), 0)
    expected = whitening_filters(model.normalize(first), 2, model.backbone.whiten_eps)
    torch.testing.assert_close(model.backbone.stem.weight, expected)
    model.training_step((second, labels), 1)  # not again
    torch.testing.assert_close(model.backbone.stem.weight, expected)
    assert not model.backbone.stem.weight.requires_grad

    state = model.state_dict()
    assert bool(state["backbone.whitened"])
    fresh = tiny_model(in_chans=3, total_steps=4, crop_padding=0)
    fresh.load_state_dict(state)
    fresh.training_step((second, labels), 0)  # a loaded module does not whiten again
    torch.testing.assert_close(fresh.backbone.stem.weight, expected)


# --------------------------------------------------------------------------- label smoothing, lookahead, schedule


def test_the_loss_is_label_smoothed_cross_entropy():
    model = tiny_model(label_smoothing=0.3, crop_padding=0, total_steps=1)
    x, y = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    loss = model.training_step((x, y, torch.arange(6)), 0)
    log_p = F.log_softmax(model(x), dim=1)
    by_hand = -(0.7 * log_p[torch.arange(6), y] + 0.3 * log_p.mean(dim=1)).mean()
    torch.testing.assert_close(loss, by_hand)
    assert not torch.allclose(loss, F.cross_entropy(model(x), y))


def quadratic_grads(p, target):
    return p - target  # the gradient of 0.5 |p - target|^2


def test_lookahead_is_the_ema_of_the_fast_weights_every_k_steps():
    torch.manual_seed(0)
    start, target = torch.randn(5), torch.randn(5)
    lr, k, decay = 0.3, 3, 0.6
    p = start.clone().requires_grad_(True)
    optimizer = Lookahead(torch.optim.SGD([p], lr=lr), every=k, decay=decay)
    fast, slow = start.clone(), start.clone()
    for step in range(1, 3 * k + 2):
        p.grad = quadratic_grads(p.detach(), target)
        optimizer.step()
        fast = fast - lr * quadratic_grads(fast, target)
        if step % k == 0:
            slow = slow + (1 - decay) * (fast - slow)
            fast = slow.clone()
            torch.testing.assert_close(optimizer.state[p]["lookahead"], slow)
        torch.testing.assert_close(p.detach(), fast)
    assert not torch.allclose(p.detach(), start - lr * quadratic_grads(start, target))


def test_lookahead_ramps_its_decay_and_ends_on_the_slow_weights_and_resumes():
    torch.manual_seed(0)
    start, target = torch.randn(4), torch.randn(4)
    total, k = 7, 2

    def run(steps, state=None):
        p = start.clone().requires_grad_(True)
        optimizer = Lookahead(torch.optim.SGD([p], lr=0.2, momentum=0.5), every=k, decay=0.8, total_steps=total)
        if state is not None:
            with torch.no_grad():
                p.copy_(state[0])
            optimizer.load_state_dict(state[1])
        for _ in range(steps):
            p.grad = quadratic_grads(p.detach(), target)
            optimizer.step()
        return p, optimizer

    assert [run(0)[1].decay_at(t) for t in (2, 4, 7)] == [0.8 * (2 / 7) ** 3, 0.8 * (4 / 7) ** 3, 1.0]
    p, optimizer = run(total)
    assert torch.equal(p.detach(), optimizer.state[p]["lookahead"])  # the fit ends on the slow weights
    # resuming from a state_dict after 3 steps gives the uninterrupted result
    half_p, half = run(3)
    resumed_p, resumed = run(total - 3, (half_p.detach().clone(), half.state_dict()))
    assert resumed.param_groups[0]["lookahead_step"] == total
    torch.testing.assert_close(resumed_p.detach(), p.detach(), rtol=0, atol=0)


def test_configure_optimizers_steps_the_schedule_per_step_with_scaled_bn_biases():
    model = tiny_model(lr=0.5, weight_decay=1e-3, bias_scaler=8.0, total_steps=100, warmup=0.2, start_factor=0.1,
                       end_factor=0.05)
    conf = model.configure_optimizers()
    optimizer, scheduler = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, Lookahead) and conf["lr_scheduler"]["interval"] == "step"
    others, biases = optimizer.param_groups
    assert biases["lr"] == pytest.approx(0.5 * 8 * 0.1) and biases["weight_decay"] == pytest.approx(1e-3 / 8)
    bn_biases = {id(m.bias) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {id(p) for p in biases["params"]} == bn_biases
    assert all(id(p) not in bn_biases and p.requires_grad for p in others["params"])
    assert id(model.backbone.stem.weight) not in {id(p) for p in others["params"]}  # the whitening is fixed
    factors = []
    for _ in range(100):
        factors.append(optimizer.param_groups[0]["lr"] / 0.5)
        scheduler.step()
    schedule = WarmupLinearDecay(100, 0.2, 0.1, 0.05)
    assert factors[0] == pytest.approx(0.1) and factors[20] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(1 + (0.05 - 1) * 40 / 80) and factors == pytest.approx([schedule(t) for t in range(100)])
    assert schedule(100) == pytest.approx(0.05) and schedule(500) == pytest.approx(0.05)
    assert not isinstance(tiny_model(lookahead_every=0, total_steps=5).configure_optimizers()["optimizer"], Lookahead)


# --------------------------------------------------------------------------- test-time augmentation


def test_tta_averages_the_views_it_names():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 6, 6)
    weight = torch.randn(10, 36)
    f = lambda v: v.flatten(1) @ weight.T  # noqa: E731  (not flip- or shift-invariant)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[..., 2:8, 2:8], padded[..., 0:6, 0:6]  # x shifted by (-1, -1) and (+1, +1)
    mirror = lambda v: 0.5 * (f(v) + f(v.flip(-1)))  # noqa: E731
    torch.testing.assert_close(tta_logits(f, x, "none"), f(x))
    torch.testing.assert_close(tta_logits(f, x, "flip"), mirror(x))
    torch.testing.assert_close(tta_logits(f, x, "translate"), 0.5 * f(x) + 0.25 * (f(up_left) + f(down_right)))
    torch.testing.assert_close(tta_logits(f, x, "flip_translate"),
                               0.5 * mirror(x) + 0.25 * (mirror(up_left) + mirror(down_right)))
    assert torch.equal(up_left[..., :-1, :-1], x[..., 1:, 1:]) and torch.equal(down_right[..., 1:, 1:], x[..., :-1, :-1])

    model = tiny_model(tta="flip")
    plain = lambda v: ImageClassifier.forward(model, v)  # noqa: E731
    model.eval()
    torch.testing.assert_close(model(x), 0.5 * (plain(x) + plain(x.flip(-1))))
    model.train()
    torch.testing.assert_close(model(x), plain(x))  # no TTA while training
    assert FastImageClassifier(flip=True).tta == "flip_translate" and FastImageClassifier(flip=False).tta == "translate"


# --------------------------------------------------------------------------- determinism, resume


def fit(root, seed=0, **kwargs):
    L.seed_everything(seed, verbose=False)
    model = tiny_model()
    trainer(root, enable_checkpointing=False, **kwargs).fit(model, datamodule=tiny_digits())
    return model


def test_same_seed_same_weights(tmp_path):
    first, second, other = fit(tmp_path / "a"), fit(tmp_path / "b"), fit(tmp_path / "c", seed=1)
    assert torch.equal(weights(first), weights(second))
    assert not torch.equal(weights(first), weights(other))
    assert bool(first.backbone.whitened)


def test_a_killed_and_resumed_fit_ends_with_the_uninterrupted_weights(tmp_path, monkeypatch):
    class CrashAt(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == CRASH_EPOCH:
                raise RuntimeError("simulated crash")

    whole = fit(tmp_path / "whole")
    L.seed_everything(0, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(tmp_path / "crashed", callbacks=[checkpoint, CrashAt()]).fit(tiny_model(), datamodule=tiny_digits())

    calls = []
    real = AirbenchNet.init_whitening
    monkeypatch.setattr(AirbenchNet, "init_whitening", lambda self, x: (calls.append(1), real(self, x)))
    L.seed_everything(0, verbose=False)
    torch.manual_seed(1234)  # the global RNG at resume differs from the uninterrupted run's
    resumed = tiny_model()
    trainer(tmp_path / "resumed", enable_checkpointing=False).fit(resumed, datamodule=tiny_digits(),
                                                                   ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert calls == []  # the whitening came from the checkpoint
    assert torch.equal(weights(resumed), weights(whole))


# --------------------------------------------------------------------------- certification's plain loop


class OwnFast(FastImageClassifier):
    """A user's subclass: the certification loop trains it as any user's module, by its own training_step."""


CERTIFY = dict(smoothing={"class_path": "lightning_defense.datamodules.GaussianNoiseDataModule",
                          "init_args": {"sigma": 0.1}},
               num_models=6, n0=1, alpha=0.1, num_test_points=30, progress_bar=False)
FAST_ARGS = dict(backbone_kwargs={"widths": [16, 32, 32]}, flip=False, crop_padding=1, tta="translate", lr=0.8)


def certified(result, output_dir):
    with open(output_dir / "certificates.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    radius = np.array([float(r["radius"]) for r in rows])
    correct = np.array([int(r["correct"]) for r in rows], dtype=bool)
    assert result.complete and (correct & (radius > 0)).any()  # some points certified at a positive radius
    assert result.summary["certified_accuracy"]["0"] > 0.5 and result.trained == list(range(6))


def test_certifies_as_a_recipe_of_the_loop_several_models_at_once(tmp_path):
    """FastImageClassifier by class path is one of the loop's recipes: stacked in groups, its steps counted for it."""
    model = {"class_path": "lightning_defense.models.FastImageClassifier", "init_args": FAST_ARGS}
    training = TrainingOptions(max_epochs=3, accelerator="cpu", models_per_batch=3)
    result = run_certification(DigitsDataModule(image_size=8, batch_size=64), model=model, output_dir=tmp_path,
                               training=training, **CERTIFY)
    certified(result, tmp_path)
    with pytest.raises(ValueError, match="model.num_classes comes from the datamodule"):
        run_certification(DigitsDataModule(image_size=8, batch_size=64), output_dir=tmp_path / "linked",
                          model={**model, "init_args": {**FAST_ARGS, "num_classes": 10}}, training=training, **CERTIFY)


def test_a_subclass_certifies_through_the_plain_loop_for_user_modules(tmp_path):
    dm = DigitsDataModule(image_size=8, batch_size=64)
    dm.setup("fit")
    epochs = 3
    steps = epochs * math.ceil(len(dm.train_set) / 64)
    init_args = dict(FAST_ARGS, num_classes=10, in_chans=1, total_steps=steps)
    model = {"class_path": f"{__name__}.OwnFast", "init_args": init_args}
    training = TrainingOptions(max_epochs=epochs, accelerator="cpu")
    result = run_certification(DigitsDataModule(image_size=8, batch_size=64), model=model, output_dir=tmp_path,
                               training=training, **CERTIFY)
    certified(result, tmp_path)
    with pytest.raises(ValueError, match="needs total_steps.*max_epochs x training batches"):
        run_certification(DigitsDataModule(image_size=8, batch_size=64), output_dir=tmp_path / "no_steps",
                          model={**model, "init_args": {**init_args, "total_steps": None}}, training=training,
                          **CERTIFY)


# --------------------------------------------------------------------------- arguments, configs


@pytest.mark.parametrize("kwargs, match", [
    (dict(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\)"),
    (dict(lookahead_every=-1), "lookahead_every must be an int >= 0"),
    (dict(lookahead_decay=1.5), r"lookahead_decay must be in \[0, 1\]"),
    (dict(tta="mirror"), r"tta must be one of \('none', 'flip', 'translate', 'flip_translate'\)"),
    (dict(total_steps=0), "total_steps must be an int >= 1"),
    (dict(warmup=1.0), r"warmup must be a fraction"),
    (dict(bias_scaler=0), "bias_scaler must be > 0"),
    (dict(backbone="small_cnn", backbone_kwargs=None), "whiten=True needs a backbone with init_whitening.*whiten=False"),
    (dict(backbone_kwargs={"widths": []}), "widths must be a non-empty list"),
    (dict(backbone_kwargs={"whiten_eps": 0}), "whiten_eps must be > 0"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(**kwargs)


def test_without_a_trainer_or_total_steps_the_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="needs total_steps"):
        tiny_model().configure_optimizers()
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        Lookahead(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), every=0)


def test_airbench_is_a_backbone_of_imageclassifier_too():
    net = build_backbone("airbench", 10, 1, widths=[8, 8])
    assert isinstance(net, AirbenchNet) and net(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    model = ImageClassifier("airbench", num_classes=10, in_chans=1, backbone_kwargs={"widths": [8, 8]})
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_the_cifar_fast_recipe_config_fits_on_a_synthetic_archive(tmp_path):
    make_archive(tmp_path, as_tar=True, n=20)  # 100 training images in the real CIFAR-10 format
    cli = build_cli(["fit", "--config", str(ROOT / "configs" / "cifar10" / "fast_recipe.yaml"),
                     f"--data.init_args.data_dir={tmp_path}", "--trainer.max_epochs=1",
                     "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
                     "--trainer.enable_progress_bar=false", "--trainer.logger=false", "--trainer.accelerator=cpu",
                     f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.enable_checkpointing=false",
                     "--model.init_args.backbone_kwargs.widths=[8,16,16]"])
    assert isinstance(cli.model, FastImageClassifier) and bool(cli.model.backbone.whitened)
    assert cli.trainer.global_step == 1 and cli.model.hparams.label_smoothing == 0.2


def test_the_fashion_mnist_fast_config_builds():
    cli = build_cli(["--config", str(ROOT / "configs" / "fashion_mnist" / "fast_baseline.yaml")], run=False)
    assert isinstance(cli.model, FastImageClassifier) and cli.model.hparams.in_chans == 1


def test_a_fit_whose_last_batch_is_one_image_says_how_to_avoid_it(tmp_path):
    """airbench reaches 1x1 at 8x8 pixels: BatchNorm then refuses a batch of one; the error names the fix."""
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.rand(33, 1, 8, 8, generator=gen), torch.arange(33) % 10
    dataset = torch.utils.data.TensorDataset(images, labels)
    model = tiny_model(crop_padding=0)
    with pytest.raises(ValueError, match=r"training batch 1 holds one image.*drop_last=True") as info:
        trainer(tmp_path, max_epochs=1).fit(model, torch.utils.data.DataLoader(dataset, batch_size=32))
    assert "more than 1 value per channel" in str(info.value.__cause__)
    model = tiny_model(crop_padding=0)  # the fix the message names
    trainer(tmp_path, max_epochs=1).fit(model, torch.utils.data.DataLoader(dataset, batch_size=32, drop_last=True))
    assert model.trainer.global_step == 1

"""Issue #13.6: hook-order hazards between training-time defenses.

Callbacks that run forward passes in eval mode (PGD adversarial training, FRIENDS' Algorithm 1) must give
every submodule its own mode back, not call a blanket ``train()``: that would undo LinearProbe's frozen,
eval-mode extractor, whose BatchNorm statistics would then drift. And AdversarialTraining's random-start
stream must survive a crash and resume.
"""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_defense.callbacks import AdversarialTraining, FriendsNoise, LinearProbe
from lightning_defense.callbacks.modes import eval_mode
from lightning_defense.datamodules import DigitsDataModule
from lightning_defense.models import ImageClassifier


def _digits():
    return DigitsDataModule(image_size=8, val_fraction=0.05, test_fraction=0.85, batch_size=32, seed=0)  # 180 samples


def _model():  # no crop or flip: the callbacks' streams are the only randomness of a fit
    return ImageClassifier("small_cnn", num_classes=10, in_chans=1, lr=0.05, crop_padding=0, flip=False,
                           backbone_kwargs={"width": 4})


def _trainer(tmp_path, callbacks, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, max_epochs=1, limit_val_batches=0, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                    default_root_dir=str(tmp_path))
    return L.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def _extractor_modules(model):
    head = set(model.backbone.fc.modules())
    return [m for m in model.backbone.modules() if m not in head]


class ExtractorModes(L.Callback):
    """Records the extractor's modes in every BatchNorm forward pass, after every step, and at epoch starts."""

    def __init__(self):
        self.in_forward, self.after_step, self.at_epoch_start = [], [], []

    def on_fit_start(self, trainer, pl_module):
        for m in _extractor_modules(pl_module):
            if isinstance(m, torch.nn.BatchNorm2d):
                m.register_forward_pre_hook(lambda module, args: self.in_forward.append(module.training))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step.append([m.training for m in _extractor_modules(pl_module)])

    def on_train_epoch_start(self, trainer, pl_module):
        self.at_epoch_start.append((trainer.current_epoch, [m.training for m in _extractor_modules(pl_module)]))


def test_eval_mode_restores_each_submodules_own_mode():
    model = _model()
    model.backbone.eval()
    model.backbone.fc.train()
    before = [m.training for m in model.modules()]
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("the block failed")
    assert [m.training for m in model.modules()] == before


@pytest.mark.parametrize("adversarial_first", [False, True])
def test_linear_probe_with_adversarial_training_keeps_the_extractor_frozen(tmp_path, adversarial_first):
    L.seed_everything(0)
    model = _model()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    modes = ExtractorModes()
    callbacks = [LinearProbe(), AdversarialTraining(eps=8 / 255, steps=2)]
    if adversarial_first:
        callbacks.reverse()
    _trainer(tmp_path, callbacks + [modes], max_epochs=2, limit_train_batches=3).fit(model, datamodule=_digits())

    after = model.backbone.state_dict()
    for key, value in before.items():
        if key.startswith("fc."):
            assert not torch.equal(after[key], value), key  # the head trains
        else:
            assert torch.equal(after[key], value), key  # weights and BatchNorm statistics unchanged
    assert len(modes.after_step) == 6 and not any(any(step) for step in modes.after_step)
    assert modes.in_forward and not any(modes.in_forward)  # BatchNorm never ran in train mode, PGD's passes included
    assert model.backbone.fc.training  # the head itself trains in train mode


def test_friends_generation_gives_every_submodule_its_own_mode_back(tmp_path):
    L.seed_everything(0)
    model = _model()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items() if not k.startswith("fc.")}
    modes = ExtractorModes()
    friends = FriendsNoise(begin_epoch=1, steps=1, batch_size=64, noise_dir=tmp_path / "noise")
    _trainer(tmp_path, [LinearProbe(), friends, modes], max_epochs=2, limit_train_batches=2).fit(
        model, datamodule=_digits())
    assert friends.friendly_noise is not None
    epoch, extractor = modes.at_epoch_start[1]
    assert epoch == 1 and not any(extractor)  # right after generation: the extractor is still in eval mode
    after = model.backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


class RecordAdversarial(L.Callback):
    """The adversarial batches as the model receives them (placed after AdversarialTraining)."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((trainer.current_epoch, batch[0].clone()))


class Crash(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            raise RuntimeError("simulated crash")


def _weights(model):
    return torch.cat([t.detach().flatten().float() for t in model.state_dict().values()])


def test_a_resumed_fit_continues_the_pgd_random_starts(tmp_path):
    L.seed_everything(0)
    whole, whole_model = RecordAdversarial(), _model()
    _trainer(tmp_path / "whole", [AdversarialTraining(eps=8 / 255, steps=2), whole], max_epochs=4).fit(
        whole_model, datamodule=_digits())

    L.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(tmp_path / "crashed", [AdversarialTraining(eps=8 / 255, steps=2), checkpoint, Crash()], max_epochs=4,
                 enable_checkpointing=True).fit(_model(), datamodule=_digits())
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=True)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("AdversarialTraining")]
    assert len(state["generators"]) == 1 and state["generators"][0]["device"] == "cpu"

    L.seed_everything(0)
    torch.manual_seed(1234)  # the global RNG at resume differs from the uninterrupted run's
    resumed, resumed_model = RecordAdversarial(), _model()
    _trainer(tmp_path / "resumed", [AdversarialTraining(eps=8 / 255, steps=2), resumed], max_epochs=4).fit(
        resumed_model, datamodule=_digits(), ckpt_path=str(last))

    later = [(e, x) for e, x in whole.batches if e >= 2]
    assert len(later) == len(resumed.batches) == 12
    assert all(e == f and torch.equal(x, y) for (e, x), (f, y) in zip(later, resumed.batches))  # the same PGD noise
    assert torch.equal(_weights(resumed_model), _weights(whole_model))

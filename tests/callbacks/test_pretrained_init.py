import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import save_file

from lightning_defense.callbacks import PretrainedInit
from lightning_defense.datamodules import DigitsDataModule
from lightning_defense.models import ImageClassifier
from tests.callbacks.ddp_training_defenses_script import (
    Crash,
    run,
    save_pretrained_checkpoint,
    tiny_digits,
    tiny_model,
    trainer_kwargs,
)


class StartState(Callback):
    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.clone() for k, v in pl_module.backbone.state_dict().items()}


def fit_and_get_start_state(tmp_path, callback, model=None, **kwargs):
    start = StartState()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, callbacks=[callback, start], **trainer_kwargs(tmp_path, **kwargs))
    trainer.fit(model or tiny_model(), datamodule=tiny_digits())
    return start.state


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of model_name=.*or checkpoint_path="):
        PretrainedInit()
    with pytest.raises(ValueError, match="exactly one"):
        PretrainedInit(model_name="resnet18.a1_in1k", checkpoint_path="x.pt")
    with pytest.raises(FileNotFoundError, match="checkpoint_path '/nope/w.safetensors' does not exist"):
        PretrainedInit(checkpoint_path="/nope/w.safetensors")
    (tmp_path / "w.txt").write_text("x")
    torch.save({}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="must end in one of"):
        PretrainedInit(checkpoint_path=tmp_path / "w.txt")
    with pytest.raises(ValueError, match="'not_a_model.tag' is not a timm model"):
        PretrainedInit(model_name="not_a_model.tag")
    with pytest.raises(ValueError, match="pretrained_file is the local weight file of model_name"):
        PretrainedInit(checkpoint_path=tmp_path / "w.pt", pretrained_file=tmp_path / "w.pt")


@pytest.mark.parametrize("form", ["safetensors", "pt", "lightning"])
def test_local_checkpoint_initialises_all_but_the_head(tmp_path, form):
    L.seed_everything(123)
    source = ImageClassifier("small_cnn", num_classes=5, in_chans=1, backbone_kwargs={"width": 4})
    state = source.backbone.state_dict()
    if form == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    elif form == "pt":
        path = tmp_path / "w.pt"
        torch.save(state, path)
    else:
        path = tmp_path / "w.ckpt"
        torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    L.seed_everything(0)
    target = tiny_model()  # 10 classes: the 5-class head cannot be loaded
    head_before = target.backbone.fc.weight.detach().clone()
    loaded = fit_and_get_start_state(tmp_path, PretrainedInit(checkpoint_path=path), model=target)
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        torch.testing.assert_close(loaded[key], value, atol=0, rtol=0, msg=key)
    assert loaded["fc.weight"].shape == (10, 16)
    torch.testing.assert_close(loaded["fc.weight"], head_before)  # the fresh head, not a copy of anything


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    wide = ImageClassifier("small_cnn", num_classes=10, in_chans=1, backbone_kwargs={"width": 8})
    save_file(wide.backbone.state_dict(), str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match="does not fit SmallCNN: shape mismatches.*features.0.weight"):
        fit_and_get_start_state(tmp_path, PretrainedInit(checkpoint_path=tmp_path / "wide.safetensors"))


def fake_hf_cache(root, hub_id, state):
    """The layout huggingface_hub uses: models--org--name/{refs/main, snapshots/<rev>/model.safetensors}."""
    repo = root / ("models--" + hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    save_file(state, str(repo / "snapshots" / "0123abcd" / "model.safetensors"))


@pytest.mark.parametrize("where", ["pretrained_file", "hf_cache"])
def test_timm_name_loads_local_weights_offline(tmp_path, monkeypatch, where):
    import huggingface_hub.constants
    import timm

    torch.manual_seed(7)
    pretrained = timm.create_model("test_resnet", num_classes=1000).state_dict()  # stands in for the hub file
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    if where == "pretrained_file":
        save_file(pretrained, str(tmp_path / "model.safetensors"))
        callback = PretrainedInit(model_name="test_resnet.r160_in1k", pretrained_file=tmp_path / "model.safetensors", download=False)
    else:
        fake_hf_cache(tmp_path / "hub", "timm/test_resnet.r160_in1k", pretrained)
        callback = PretrainedInit(model_name="test_resnet.r160_in1k", download=False)
    model = ImageClassifier("test_resnet", num_classes=10, in_chans=3, flip=False, crop_padding=0)
    start = StartState()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, callbacks=[callback, start], **trainer_kwargs(tmp_path))
    trainer.fit(model, datamodule=DigitsDataModule(image_size=16, num_channels=3, val_fraction=0.05, test_fraction=0.85))
    assert start.state["fc.weight"].shape == (10, 96)
    body = [k for k in pretrained if not k.startswith("fc.")]
    assert len(body) > 20
    for key in body:
        torch.testing.assert_close(start.state[key], pretrained[key], atol=0, rtol=0, msg=key)


def test_offline_without_weights_names_what_to_download(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    model = ImageClassifier("test_resnet", num_classes=10, in_chans=1)
    with pytest.raises(FileNotFoundError, match=r"huggingface.co/timm/test_resnet.r160_in1k/resolve/main/model.safetensors.*pretrained_file="):
        fit_and_get_start_state(tmp_path, PretrainedInit(model_name="test_resnet.r160_in1k", download=False), model=model)


def test_timm_name_for_another_architecture_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="'test_resnet.r160_in1k' is a 'test_resnet' but the backbone is SmallCNN.*backbone='test_resnet'"):
        fit_and_get_start_state(tmp_path, PretrainedInit(model_name="test_resnet.r160_in1k", download=False))


def test_resumed_fit_keeps_its_own_weights(tmp_path):
    save_pretrained_checkpoint(tmp_path / "pretrained.safetensors")
    ckpt_dir = tmp_path / "ckpt"
    kwargs = trainer_kwargs(tmp_path, enable_checkpointing=True, max_epochs=3, limit_train_batches=2)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_epochs=1)
    init = PretrainedInit(checkpoint_path=tmp_path / "pretrained.safetensors")
    with pytest.raises(RuntimeError, match="simulated crash"):
        L.Trainer(callbacks=[init, checkpoint, Crash(epoch=1)], **kwargs).fit(tiny_model(), datamodule=tiny_digits())
    saved = torch.load(ckpt_dir / "last.ckpt", weights_only=True)["state_dict"]
    start = StartState()
    init = PretrainedInit(checkpoint_path=tmp_path / "pretrained.safetensors")
    L.Trainer(callbacks=[init, start], **{**kwargs, "enable_checkpointing": False}).fit(tiny_model(), datamodule=tiny_digits(), ckpt_path=str(ckpt_dir / "last.ckpt"))
    from safetensors.torch import load_file

    pretrained = load_file(str(tmp_path / "pretrained.safetensors"))
    key = "features.0.weight"
    torch.testing.assert_close(start.state[key], saved["backbone." + key], atol=0, rtol=0)
    assert not torch.allclose(start.state[key], pretrained[key])  # one epoch of training moved it


def test_ddp_two_processes_start_from_the_same_weights_as_one(tmp_path, training_defenses_ddp):
    save_pretrained_checkpoint(tmp_path / "pretrained.safetensors")
    run("pretrained", 1, tmp_path)
    one, two = torch.load(tmp_path / "pretrained.pt"), torch.load(training_defenses_ddp / "pretrained.pt")
    assert one.shape[0] == 1 and two.shape[0] == 2
    torch.testing.assert_close(two[0], one[0], atol=0, rtol=0)
    torch.testing.assert_close(two[1], one[0], atol=0, rtol=0)
    L.seed_everything(123)
    expected = tiny_model().backbone  # the checkpoint's weights, head included: same seed, same head init
    body = torch.cat([p.detach().flatten() for n, p in expected.named_parameters() if not n.startswith("fc.")])
    torch.testing.assert_close(one[0][: len(body)], body, atol=0, rtol=0)


def test_second_fit_on_the_same_model_continues_from_its_weights(tmp_path):
    save_pretrained_checkpoint(tmp_path / "pretrained.safetensors")
    init, model = PretrainedInit(checkpoint_path=tmp_path / "pretrained.safetensors"), tiny_model()
    L.Trainer(max_epochs=1, limit_train_batches=2, callbacks=[init], **trainer_kwargs(tmp_path)).fit(model, datamodule=tiny_digits())
    trained = model.backbone.state_dict()["features.0.weight"].clone()
    state = fit_and_get_start_state(tmp_path, init, model=model)
    torch.testing.assert_close(state["features.0.weight"], trained, atol=0, rtol=0)

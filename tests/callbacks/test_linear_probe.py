"""LinearProbe: the transfer victim's backbone is loaded, frozen (BatchNorm statistics included); the head learns."""

import lightning as L
import pytest
import torch
from safetensors.torch import save_file

from lightning_defense.callbacks import LinearProbe
from lightning_defense.datamodules import DigitsDataModule
from lightning_defense.models import ImageClassifier


def _fit(tmp_path, callbacks):
    L.seed_everything(0, verbose=False)
    model = ImageClassifier("small_cnn", num_classes=10, in_chans=1, backbone_kwargs={"width": 4}, crop_padding=0,
                            flip=False)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=3, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), callbacks=callbacks)
    trainer.fit(model, datamodule=DigitsDataModule(image_size=8, batch_size=64))
    return model


def test_backbone_is_loaded_and_frozen_and_the_head_trains(tmp_path):
    torch.manual_seed(1)
    source = ImageClassifier("small_cnn", num_classes=10, in_chans=1, backbone_kwargs={"width": 4})
    for module in source.modules():  # distinctive BatchNorm statistics, so loading them is visible
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    extractor = {k: v.contiguous() for k, v in source.backbone.state_dict().items()}
    path = tmp_path / "extractor.safetensors"
    save_file(extractor, str(path))

    model = _fit(tmp_path, [LinearProbe(checkpoint_path=path)])
    after = model.backbone.state_dict()
    for key, value in extractor.items():
        if key.startswith("fc."):
            assert not torch.equal(after[key], value)  # the fresh head, trained
        else:
            assert torch.equal(after[key], value), key  # weights and BatchNorm statistics unchanged
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["backbone.fc.weight", "backbone.fc.bias"]

    # Without the callback the same fit moves the BatchNorm statistics: the check above is not vacuous.
    plain = _fit(tmp_path, [])
    assert not torch.equal(plain.backbone.state_dict()["features.1.running_mean"], after["features.1.running_mean"])


def test_bad_checkpoint_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint_path .*missing.safetensors' does not exist"):
        LinearProbe(checkpoint_path=tmp_path / "missing.safetensors")
    wrong = tmp_path / "wide.safetensors"
    wide = ImageClassifier("small_cnn", num_classes=10, in_chans=1, backbone_kwargs={"width": 8})
    save_file({k: v.contiguous() for k, v in wide.backbone.state_dict().items()}, str(wrong))
    with pytest.raises(ValueError, match="does not fit SmallCNN: shape mismatches"):
        _fit(tmp_path, [LinearProbe(checkpoint_path=wrong)])

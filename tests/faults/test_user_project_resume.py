"""FRIENDS on a user's project (dict batches, normalised in __getitem__) resumed from a checkpoint: the
friendly noise comes back from its side file (not generated again), and the resumed epoch trains on the same
defended items as the uninterrupted fit; a damaged side file is refused."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_defense.callbacks import FriendsNoise
from lightning_defense.callbacks import friends_noise as module
from tests.integration.projects import dict_batches


def data():
    dm = dict_batches.StripesDataModule()
    dm.normalization = ((dict_batches.MEAN,), (dict_batches.STD,))
    return dm


class Items(L.Callback):
    """Every epoch's defended training items, read from the training loader's dataset at the epoch's start."""

    def __init__(self):
        self.items = {}

    def on_train_epoch_start(self, trainer, pl_module):
        dataset = trainer.train_dataloader.dataset
        self.items[trainer.current_epoch] = torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def fit(tmp_path, epochs, ckpt_path=None, checkpoint=False):
    friends = FriendsNoise(begin_epoch=1, steps=2, batch_size=16, noise_type="uniform", noise_dir=str(tmp_path / "noise"))
    items = Items()
    callbacks = [friends, items] + ([ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)] if checkpoint else [])
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=checkpoint, default_root_dir=str(tmp_path),
                        callbacks=callbacks, limit_val_batches=0)
    L.seed_everything(0, verbose=False)
    trainer.fit(dict_batches.StripesClassifier(), datamodule=data(), ckpt_path=ckpt_path)
    return friends, items


def test_resumed_user_fit_reads_the_noise_back_and_trains_on_the_same_items(tmp_path, monkeypatch):
    whole, whole_items = fit(tmp_path / "whole", 3)
    first, _ = fit(tmp_path / "run", 2, checkpoint=True)
    monkeypatch.setattr(module.FriendsNoise, "_generate", lambda *a, **k: pytest.fail("generated again on resume"))
    resumed, resumed_items = fit(tmp_path / "run", 3, ckpt_path=str(tmp_path / "run" / "ckpt" / "last.ckpt"))
    assert torch.equal(resumed.friendly_noise, first.friendly_noise)
    assert torch.equal(first.friendly_noise, whole.friendly_noise)  # generated from the same model at epoch 1
    assert torch.equal(resumed_items.items[2], whole_items.items[2])  # friendly + keyed random noise of epoch 2


def test_a_damaged_side_file_is_refused_on_resume(tmp_path):
    fit(tmp_path, 2, checkpoint=True)
    chunk = sorted((tmp_path / "noise").rglob("chunk_*.npy"))[0]
    raw = bytearray(chunk.read_bytes())
    raw[-1] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="(?i)digest|damaged|corrupt|does not match"):
        fit(tmp_path, 3, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))

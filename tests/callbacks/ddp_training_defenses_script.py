"""Run by the FriendsNoise / WarmStart / PretrainedInit tests, on 1 process or as 2-process CPU DDP.

``python ddp_training_defenses_script.py MODES DEVICES OUT_DIR``: for each of the comma-separated MODES
one fit runs (all in the same DDP processes, to pay the start-up once) and global rank 0 writes
``OUT_DIR/<mode>.pt`` with ``torch.save`` (tensors only):

* ``friends``: each rank's friendly-noise tensor generated at epoch 0 (in 3 chunks), stacked; then, from a second fit
  generating at epoch 1 (when BatchNorm statistics differ per rank), ``friends_late.pt``: each rank's
  noise, stacked (world, N, C, H, W);
* ``warm``: for each epoch, every (index, image checksum) trained on, gathered from all ranks;
* ``pretrained``: each rank's backbone weights when training starts, after ``PretrainedInit`` loaded
  ``OUT_DIR/pretrained.safetensors`` (written by :func:`save_pretrained_checkpoint`).

The tiny data, model and recording callbacks here are shared by the three tests.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_defense.callbacks import FriendsNoise, PretrainedInit, WarmStart
from lightning_defense.datamodules import DigitsDataModule
from lightning_defense.models import ImageClassifier


def tiny_digits(batch_size: int = 16) -> DigitsDataModule:
    """180 training digits at 8x8."""
    return DigitsDataModule(image_size=8, val_fraction=0.05, test_fraction=0.85, batch_size=batch_size, seed=0)


def tiny_model(**kwargs) -> ImageClassifier:
    return ImageClassifier("small_cnn", num_classes=10, in_chans=1, lr=0.05, flip=False, crop_padding=1, backbone_kwargs={"width": 4}, **kwargs)


class SeenImages(Callback):
    """Records ``(epoch, index, image sum)`` of every training sample as the model receives it."""

    def __init__(self) -> None:
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, _, idx = batch
        epoch = torch.full_like(idx, trainer.current_epoch, dtype=torch.float64)
        self.rows.append(torch.stack([epoch, idx.double(), x.double().flatten(1).sum(1)], dim=1))


class StartWeights(Callback):
    def on_train_start(self, trainer, pl_module):
        self.weights = torch.cat([p.detach().flatten().clone() for p in pl_module.backbone.parameters()])


def save_pretrained_checkpoint(path) -> None:
    """Save the backbone of :func:`tiny_model` built with seed 123: weights a seed-0 run cannot have."""
    from safetensors.torch import save_file

    L.seed_everything(123)
    save_file(tiny_model().backbone.state_dict(), str(path))


class Crash(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == 1:
            raise RuntimeError("simulated crash")


class RecordImages(Callback):
    """Keeps the images as the model receives them (after FriendsNoise, before augmentation)."""

    def __init__(self) -> None:
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((trainer.current_epoch, batch[0].clone(), batch[2].clone()))


def trainer_kwargs(tmp_path, **kwargs):
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=str(tmp_path), limit_val_batches=0,
    )
    return {**defaults, **kwargs}


def run(mode: str, devices: int, out_dir) -> None:
    out = str(Path(out_dir) / f"{mode}.pt")
    checkpoint = str(Path(out_dir) / "pretrained.safetensors")
    L.seed_everything(0)
    callbacks, extra = [], {}
    if mode == "friends":
        friends = FriendsNoise(begin_epoch=0, steps=3, batch_size=64, noise_type="uniform", noise_dir=Path(out_dir) / "noise", chunk_size=64)
        callbacks, extra = [friends], {"max_epochs": 1, "limit_train_batches": 1}
    elif mode == "warm":
        seen = SeenImages()
        warm = WarmStart(epochs=1, wrapper="lightning_defense.datamodules.GaussianNoiseDataModule", wrapper_kwargs={"sigma": 0.5})
        callbacks, extra = [warm, seen], {"max_epochs": 2}
    elif mode == "pretrained":
        start = StartWeights()
        callbacks, extra = [PretrainedInit(checkpoint_path=checkpoint), start], {"max_epochs": 1, "limit_train_batches": 2}
    else:
        raise ValueError(mode)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", limit_val_batches=0,
        logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=callbacks, **extra,
    )
    trainer.fit(tiny_model(), datamodule=tiny_digits())
    if mode == "friends":
        result = trainer.strategy.all_gather(friends._noise) if devices > 1 else friends._noise[None]
    elif mode == "warm":
        rows = torch.cat(seen.rows)
        result = trainer.strategy.all_gather(rows).reshape(-1, 3) if devices > 1 else rows
    else:
        result = trainer.strategy.all_gather(start.weights) if devices > 1 else start.weights[None]
    if trainer.global_rank == 0:
        torch.save(result, out)
    trainer.strategy.barrier()
    if mode == "friends":
        late = FriendsNoise(begin_epoch=1, steps=1, batch_size=64, noise_dir=Path(out_dir) / "noise", chunk_size=64)
        trainer = L.Trainer(
            accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", limit_val_batches=0,
            logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
            callbacks=[late], max_epochs=2, limit_train_batches=2,
        )
        trainer.fit(tiny_model(), datamodule=tiny_digits())
        stacked = trainer.strategy.all_gather(late._noise) if devices > 1 else late._noise[None]
        if trainer.global_rank == 0:
            torch.save(stacked, str(Path(out_dir) / "friends_late.pt"))
        trainer.strategy.barrier()


if __name__ == "__main__":
    for mode in sys.argv[1].split(","):
        run(mode, int(sys.argv[2]), sys.argv[3])

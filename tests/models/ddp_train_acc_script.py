"""Run by test_train_accuracy_counts_every_ranks_samples: one epoch of a linear ImageClassifier whose weights
stay put (lr 1e-12), on 1 process or as 2-process CPU DDP.

``python ddp_train_acc_script.py DEVICES OUT_FILE``: global rank 0 writes the logged ``train/acc``.
"""

import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn

from lightning_defense.datamodules import DigitsDataModule
from lightning_defense.models import ImageClassifier


def still_linear_model() -> ImageClassifier:
    """A linear classifier that one epoch leaves as it is: its training accuracy is its accuracy on the split."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    return ImageClassifier(backbone, num_classes=10, in_chans=1, lr=1e-12, momentum=0.0, nesterov=False,
                           weight_decay=0.0, crop_padding=0, flip=False)


def fit(devices: int, root: Path) -> tuple[L.Trainer, ImageClassifier, DigitsDataModule]:
    model, dm = still_linear_model(), DigitsDataModule(image_size=8, batch_size=100)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0, default_root_dir=str(root))
    trainer.fit(model, datamodule=dm)
    return trainer, model, dm


if __name__ == "__main__":
    out = Path(sys.argv[2])
    trainer, _, _ = fit(int(sys.argv[1]), out.parent)
    if trainer.global_rank == 0:
        out.write_text(repr(float(trainer.callback_metrics["train/acc"])))

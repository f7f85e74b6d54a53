"""Run by test_dp_sgd.py: a 2-process CPU DDP fit with DPSGD; rank 0 writes epsilon and weights."""

import sys

import lightning as L
import torch

from lightning_defense.callbacks.dp_sgd import DPSGD
from lightning_defense.datamodules import DigitsDataModule
from lightning_defense.models import ImageClassifier

if __name__ == "__main__":
    out = sys.argv[1]
    L.seed_everything(0)
    dm = DigitsDataModule(image_size=8, batch_size=32)
    model = ImageClassifier("small_cnn", num_classes=10, in_chans=1, lr=0.1, flip=False, backbone_kwargs={"width": 8, "norm": "group"})
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0)
    trainer = L.Trainer(
        accelerator="cpu", strategy="ddp", devices=2, max_epochs=1, limit_train_batches=4, limit_val_batches=0,
        use_distributed_sampler=False, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, callbacks=[dp],
    )
    trainer.fit(model, datamodule=dm)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = trainer.strategy.all_gather(weights)
    if trainer.global_rank == 0:
        torch.save({"epsilon": dp.epsilon, "weights": gathered}, out)
    trainer.strategy.barrier()

"""Run by test_ddp_user_project: FriendsNoise and a purifying wrapper on the torchvision-style user project,
on 1 process or as 2-process CPU DDP.

``python ddp_user_project_script.py DEVICES OUT_DIR``: global rank 0 writes ``OUT_DIR/result.pt``: every rank's
friendly noise (generated at epoch 0 with the seeded initial model), stacked, and every rank's JPEG-squeezed (ISS)
training pixels, stacked.
"""

import sys
from pathlib import Path

import lightning as L
import torch

from lightning_defense.callbacks import FriendsNoise
from lightning_defense.core.collective import Collective
from lightning_defense.datamodules import ShortcutSqueezeDataModule
from tests.integration.projects import torchvision_style


def main(devices: int, out: Path) -> None:
    L.seed_everything(0)
    friends = FriendsNoise(begin_epoch=0, steps=2, batch_size=8, chunk_size=16, noise_type="uniform",
                           noise_dir=str(out / "noise"))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=str(out), callbacks=[friends])
    data = ShortcutSqueezeDataModule(torchvision_style.CIFARDataModule(), method="jpeg", quality=10)
    trainer.fit(torchvision_style.LitClassifier(), datamodule=data)
    collective = Collective.of(trainer)
    noise = collective.gather(friends.friendly_noise)
    pixels = collective.gather(data.train_tensors()[0])
    if collective.rank == 0:
        torch.save({"noise": torch.stack(noise), "pixels": torch.stack(pixels)}, out / "result.pt")
    print(f"MEMBER: {collective.rank + 1}/{collective.world_size}")


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))

"""Run by test_resume.py: a crop/flip ImageClassifier fit under 2-process CPU DDP, uninterrupted and resumed.

``python ddp_resume_script.py OUT_DIR NUM_WORKERS``: one fit writes a checkpoint per epoch, a second fit (in the same
processes, with another global RNG state) resumes from the checkpoint of epoch ``CRASH_EPOCH - 1``, as a
run killed there would; global rank 0 writes ``OUT_DIR/result.pt`` with each rank's batches and final
weights of both fits.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_defense.core.collective import Collective
from tests.faults.test_resume import CRASH_EPOCH, RecordBatches, tiny_digits, tiny_model, trainer_kwargs, weights


def fit(out_dir: Path, num_workers: int, callbacks, ckpt_path=None):
    record, model = RecordBatches(), tiny_model()
    trainer = L.Trainer(**trainer_kwargs(out_dir, strategy="ddp", devices=2), enable_checkpointing=bool(callbacks),
                        callbacks=[record, *callbacks])
    trainer.fit(model, datamodule=tiny_digits(num_workers), ckpt_path=ckpt_path)
    collective = Collective.of(trainer)
    return trainer, collective.gather(record.steps), collective.gather(weights(model))


if __name__ == "__main__":
    out_dir, num_workers = Path(sys.argv[1]), int(sys.argv[2])
    L.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=out_dir / "ckpt", save_top_k=-1, every_n_epochs=1)
    _, whole_steps, whole_weights = fit(out_dir, num_workers, [checkpoint])
    (ckpt,) = (out_dir / "ckpt").glob(f"epoch={CRASH_EPOCH - 1}-*.ckpt")
    L.seed_everything(0)
    torch.manual_seed(1234)  # the global RNG at resume differs from the uninterrupted run's at that epoch
    trainer, resumed_steps, resumed_weights = fit(out_dir, num_workers, [], ckpt_path=str(ckpt))
    if trainer.global_rank == 0:
        torch.save({"whole": whole_steps, "resumed": resumed_steps, "whole_weights": whole_weights,
                    "resumed_weights": resumed_weights}, out_dir / "result.pt")
    trainer.strategy.barrier()

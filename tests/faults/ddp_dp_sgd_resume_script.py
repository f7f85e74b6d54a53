"""Run by test_dp_sgd_resume.py: DPSGD under 2-process CPU DDP, uninterrupted and resumed from epoch 0.

``python ddp_dp_sgd_resume_script.py OUT_DIR``: one fit of 2 epochs writes a checkpoint per epoch, a second
fit (in the same processes) resumes from the epoch-0 checkpoint; global rank 0 writes ``OUT_DIR/result.pt``
with each run's per-rank sampled indices, final weights and epsilon, and the checkpoint's DPSGD state.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_defense.callbacks.dp_sgd import DPSGD
from lightning_defense.core.collective import Collective
from tests.faults.test_dp_sgd_resume import RecordBatches, _digits, _model


def fit(out_dir: Path, callbacks, ckpt_path=None):
    dp, record, model = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0), RecordBatches(), _model()
    trainer = L.Trainer(
        accelerator="cpu", strategy="ddp", devices=2, max_epochs=2, limit_val_batches=0, use_distributed_sampler=False,
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=bool(callbacks),
        default_root_dir=str(out_dir), callbacks=[dp, record, *callbacks],
    )
    trainer.fit(model, datamodule=_digits(), ckpt_path=ckpt_path)
    steps = Collective.of(trainer).gather([(epoch, idx.tolist()) for epoch, idx in record.steps])
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    return trainer, dp, steps, weights


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    L.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=out_dir / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer, whole_dp, whole_steps, whole_weights = fit(out_dir, [checkpoint])
    (ckpt,) = (out_dir / "ckpt").glob("epoch=0-*.ckpt")
    L.seed_everything(1)
    trainer, resumed_dp, resumed_steps, resumed_weights = fit(out_dir, [], ckpt_path=str(ckpt))
    if trainer.global_rank == 0:
        state = torch.load(ckpt, weights_only=True)["callbacks"][whole_dp.state_key]
        torch.save({"whole": whole_steps, "resumed": resumed_steps, "weights": [whole_weights, resumed_weights],
                    "epsilon": [whole_dp.epsilon, resumed_dp.epsilon], "saved_ranks": len(state["generators"])},
                   out_dir / "result.pt")
    trainer.strategy.barrier()

import os

import pytest

from lightning_defense.core.host_memory import reuse_freed_memory

os.environ.setdefault("PYTHONHASHSEED", "0")
reuse_freed_memory()  # as the command line does: CPU steps reuse their freed tensors


@pytest.fixture
def quiet_trainer_kwargs(tmp_path):
    """Trainer settings for tiny CPU runs: no progress bar, logger or checkpoints."""
    return dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )

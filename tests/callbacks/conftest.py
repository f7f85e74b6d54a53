import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def training_defenses_ddp(tmp_path_factory):
    """One 2-process CPU DDP run of FriendsNoise, WarmStart and PretrainedInit; returns its output dir."""
    from tests.callbacks.ddp_training_defenses_script import save_pretrained_checkpoint

    out = tmp_path_factory.mktemp("ddp_training_defenses")
    save_pretrained_checkpoint(out / "pretrained.safetensors")
    script = Path(__file__).with_name("ddp_training_defenses_script.py")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(script), "friends,warm,pretrained", "2", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr
    return out

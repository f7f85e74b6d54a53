"""A user's project under 2-process CPU DDP: FRIENDS' friendly noise and a purifying wrapper give every rank,
and one process, the same bytes."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def run(devices: int, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    script = Path(__file__).with_name("ddp_user_project_script.py")
    proc = subprocess.run([sys.executable, str(script), str(devices), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert f"MEMBER: {devices}/{devices}" in proc.stdout + proc.stderr
    return torch.load(out / "result.pt", weights_only=True)


def test_user_project_friendly_noise_and_purified_pixels_match_on_1_and_2_processes(tmp_path):
    one, two = run(1, tmp_path / "one"), run(2, tmp_path / "two")
    assert torch.equal(two["noise"][0], two["noise"][1]) and torch.equal(two["pixels"][0], two["pixels"][1])
    assert torch.equal(one["noise"][0], two["noise"][0])  # generated with the seeded initial model, sharded
    assert torch.equal(one["pixels"][0], two["pixels"][0])
    assert one["noise"].abs().max() > 0

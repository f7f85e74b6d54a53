"""The GPU benchmark script runs end to end in its small CPU mode, so it cannot rot between GPU loans."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_script_runs_every_stage_small_on_cpu():
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--device", "cpu", "--small"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for line in ("precision: 32", "precision: bf16", "steps: 4", "pipeline / bare time", "ratio FriendsNoise / undefended",
                 "stacked layers", "votes equal to one at a time: 1.0000", "Lightning overhead:"):
        assert line in out, (line, out[-3000:])

"""The benchmark scripts run end to end in their small CPU modes, so they cannot rot between GPU loans."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_script_runs_every_stage_small_on_cpu():
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--device", "cpu", "--small"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for line in ("precision: 32", "precision: bf16", "steps: 4", "pipeline / bare time", "ratio FriendsNoise / undefended",
                 "stacked layers", "votes equal to one at a time: 1.0000", "in groups of 2, ImageClassifier airbench",
                 "in groups of 2, FastImageClassifier airbench", "Lightning overhead (wall-clock):", "Trainer.fit of image_classifier", "Trainer.fit of bare", "Lightning overhead (CPU time):",
                 "Lightning overhead (interleaved steps, each fit step next to a plain-loop step):",
                 "models per hour on cpu (32)", "models per hour on cpu (bf16)",
                 "models per hour, fast recipe / ResNet-18 recipe, at 32x32x3:"):
        assert line in out, (line, out[-3000:])


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
def test_fast_recipe_benchmark_runs_small():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fast_recipe.py"), "--small", "--threads", "1"],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for line in ("fast recipe on Fashion-MNIST", "test accuracy", "s per model", "ResNet-18 recipe: batch 256",
                 "models per hour, fast recipe / ResNet-18 recipe, at 32x32x3:", "from measured per-step times"):
        assert line in out, (line, out[-3000:])


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
def test_feature_collision_search_runs_small():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "feature_collision_search.py"), "--train-subset",
                           "500", "--eps", "32", "--budget", "0.02", "--steps", "5", "--targets", "1", "--threads", "1"],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "fine-tuning set: 500 images; clean logistic head:" in out
    for name in ("bullseye_polytope", "poison_frogs", "feature_collision_noise_control"):
        assert f"| 32/255 | 0.02 (10) | 5 | {name} | " in out, out[-3000:]


def test_host_memory_benchmark_runs_small():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_memory.py"), "--epochs", "1", "--limit-batches",
                           "3", "--repeats", "1", "--width", "4", "--image-size", "8", "--threads", "1"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for line in ("glibc default: fit", "glibc tuned: fit", "minor page faults a step (3 steps)",
                 "fit time, glibc default / freed memory reused:"):
        assert line in out, (line, out[-3000:])


def test_lightning_overhead_in_barebones_mode_runs_small_and_refuses_a_logging_module():
    script = [sys.executable, str(ROOT / "benchmarks" / "lightning_overhead.py"), "--epochs", "1", "--repeats", "1",
              "--width", "4", "--image-size", "8", "--threads", "1", "--barebones"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*script, "--module", "bare"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for line in ("Trainer(barebones=True)", "wall-clock: Trainer.fit of bare (barebones)",
                 "Lightning overhead (interleaved steps, each fit step next to a plain-loop step):"):
        assert line in out, (line, out[-3000:])
    proc = subprocess.run(script, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # ImageClassifier
    assert proc.returncode == 2 and "--barebones needs --module bare" in proc.stderr, proc.stderr[-3000:]

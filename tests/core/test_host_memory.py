"""core.host_memory: a CPU step's freed tensors are reused instead of faulted in again (glibc)."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: The minor page faults of 20 training steps of the digits CNN (width 16, 16x16 images, batch 64), after 10 steps in
#: which a tuned heap grows to what a step needs.
STEPS = """
import resource, sys, torch
import torch.nn.functional as F
from lightning_defense.core.host_memory import reuse_freed_memory
from lightning_defense.models import SmallCNN
tuned = reuse_freed_memory() if sys.argv[1] == "tune" else False
torch.manual_seed(0)
torch.set_num_threads(1)
model = SmallCNN(10, 1, width=16)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.rand(64, 1, 16, 16), torch.randint(0, 10, (64,))
def step():
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
for _ in range(10):
    step()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's allocator only")


def steps(mode: str, **env) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    proc = subprocess.run([sys.executable, "-c", STEPS, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tuned, faults = proc.stdout.split()
    return tuned, int(faults)


def test_freed_tensors_are_reused_instead_of_faulted_in_again():
    (_, default), (tuned, faults) = steps("default"), steps("tune")
    assert tuned == "True"
    # glibc's default: the step's activations and gradients mapped again, every step. How many pages that is varies
    # with the machine (12,000 to 55,000 seen), so the bound is a hundred a step.
    assert default > 2_000
    assert faults < default / 10


def test_a_users_own_glibc_setting_stands():
    (_, tuned_faults), (tuned, faults) = steps("tune"), steps("tune", MALLOC_TRIM_THRESHOLD_="131072")
    assert tuned == "False" and faults > 2_000 and faults > 10 * tuned_faults

import subprocess
import sys

import pytest

SUBPACKAGES = ["attacks", "callbacks", "certify", "cli", "datamodules", "diffusion", "diffusion.denoiser", "models"]


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_each_subpackage_imports_first_in_a_fresh_interpreter(name):
    """No import cycle: a user's first import may be any subpackage (e.g. ``from lightning_defense.diffusion import ...``)."""
    done = subprocess.run([sys.executable, "-c", f"import lightning_defense.{name}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

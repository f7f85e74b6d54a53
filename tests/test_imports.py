import subprocess
import sys

SUBPACKAGES = ["attacks", "callbacks", "certify", "cli", "datamodules", "diffusion", "diffusion.denoiser", "evaluate", "models"]

# In one interpreter (torch and the other dependencies load once), import each subpackage first: forget every
# lightning_defense module before the next, so each import starts from nothing of the package.
SCRIPT = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for module in [m for m in sys.modules if m == "lightning_defense" or m.startswith("lightning_defense.")]:
        del sys.modules[module]
    try:
        importlib.import_module("lightning_defense." + name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_each_subpackage_imports_first():
    """No import cycle: a user's first import may be any subpackage (e.g. ``from lightning_defense.diffusion import ...``)."""
    done = subprocess.run([sys.executable, "-c", SCRIPT, *SUBPACKAGES], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]

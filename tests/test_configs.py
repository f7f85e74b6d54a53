"""Every LightningCLI config in configs/ parses, with its classes resolved (no data is read)."""

from pathlib import Path

import pytest
import yaml

from lightning_defense.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
LIGHTNING_CLI_KEYS = {"seed_everything", "trainer", "model", "data", "test_after_fit", "ckpt_path"}
FIT_CONFIGS = sorted(
    p for p in (ROOT / "configs").rglob("*.yaml")
    if "trainer" in (keys := set(yaml.safe_load(p.read_text()) or {})) and keys <= LIGHTNING_CLI_KEYS
)


@pytest.mark.parametrize("path", FIT_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_fit_config_parses(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err[-2000:]
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["class_path"].startswith("lightning_defense.")

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_defense.cli import build_cli, main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits" / "baseline.yaml"
TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.logger=false",
    "--data.init_args.image_size=16",
]


def test_print_config_links_data_into_model(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(CONFIG), "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["class_path"] == "lightning_defense.datamodules.DigitsDataModule"
    assert config["model"]["backbone"] == "small_cnn"


def test_one_epoch_fit_then_test(tmp_path):
    cli = build_cli(["fit", "--config", str(CONFIG), *TINY, f"--trainer.default_root_dir={tmp_path}"])
    assert cli.model.hparams.num_classes == 10 and cli.model.hparams.in_chans == 1  # linked from the data
    assert cli.trainer.current_epoch == 1
    assert "test/acc" in cli.trainer.callback_metrics  # test_after_fit ran
    assert list(Path(tmp_path).rglob("*.ckpt"))


def test_unknown_command_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown command 'fitt'.*fit, validate"):
        main(["fitt"])


def test_two_process_cpu_ddp_fit(tmp_path):
    cmd = [
        sys.executable, "-m", "lightning_defense.cli", "fit", "--config", str(CONFIG), *TINY,
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.deterministic=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output
    assert list(Path(tmp_path).rglob("*.ckpt"))

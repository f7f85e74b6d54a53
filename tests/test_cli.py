import csv
import json
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


def test_batch_limits_written_as_ints_stay_ints(tmp_path):
    """Lightning types limit_*_batches Union[float, int]: the parser alone reads 1 as 1.0, i.e. every batch."""
    config = tmp_path / "limits.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(CONFIG.read_text()),
                                      "trainer": {"limit_train_batches": 1, "limit_test_batches": 1.0}}))
    cli = build_cli(["fit", "--config", str(config), "--trainer.max_epochs=1", "--trainer.limit_val_batches=1",
                     "--trainer.limit_predict_batches", "0.5", "--trainer.enable_progress_bar=false",
                     "--trainer.logger=false", "--data.init_args.image_size=8", f"--trainer.default_root_dir={tmp_path}"])
    trainer = cli.trainer
    assert (trainer.limit_train_batches, trainer.limit_val_batches) == (1, 1)
    assert type(trainer.limit_train_batches) is int and type(trainer.limit_val_batches) is int
    assert trainer.num_training_batches == 1 and trainer.num_val_batches == [1]  # one batch, not all of them
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["trainer"]  # what a rerun would read
    assert (saved["limit_train_batches"], saved["limit_val_batches"], saved["limit_test_batches"]) == (1, 1, 1.0)
    assert type(saved["limit_val_batches"]) is int and type(saved["limit_test_batches"]) is float
    assert type(trainer.limit_test_batches) is float and trainer.limit_predict_batches == 0.5  # written as floats
    # the last one written wins: a command-line 1.0 after a file's 1 means every batch, and the reverse one batch
    args = ["--trainer.max_epochs=1", "--trainer.logger=false"]
    every = build_cli([*args, "--config", str(config), "--trainer.limit_train_batches=1.0"], run=False).trainer
    one = build_cli([*args, "--trainer.limit_train_batches=1.0", "-c", str(config)], run=False).trainer
    assert type(every.limit_train_batches) is float and type(one.limit_train_batches) is int


def test_print_config_writes_int_batch_limits_as_ints_and_a_rerun_from_it_reads_them_so(tmp_path, capsys):
    """``--print_config > config.yaml`` then ``--config config.yaml``: a printed 1.0 would mean every batch."""
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(CONFIG), "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
                   "--trainer.limit_test_batches=0.5", "--print_config"])
    printed = capsys.readouterr().out
    trainer = yaml.safe_load(printed)["trainer"]
    assert (trainer["limit_train_batches"], trainer["limit_val_batches"], trainer["limit_test_batches"]) == (2, 1, 0.5)
    assert type(trainer["limit_train_batches"]) is int and type(trainer["limit_val_batches"]) is int
    (tmp_path / "printed.yaml").write_text(printed)
    rerun = build_cli(["fit", "--config", str(tmp_path / "printed.yaml"), "--trainer.max_epochs=1",
                       "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                       f"--trainer.default_root_dir={tmp_path}"]).trainer
    assert (rerun.limit_train_batches, rerun.limit_val_batches, rerun.limit_test_batches) == (2, 1, 0.5)
    assert rerun.num_training_batches == 2 and rerun.num_val_batches == [1]


def test_the_shell_command_line_parses_without_lightnings_args_warning():
    """From a shell, LightningCLI reads sys.argv itself; handed the same list as args too, it warns on every run."""
    proc = subprocess.run([sys.executable, "-m", "lightning_defense.cli", "fit", "--config", str(CONFIG),
                           "--trainer.limit_val_batches=1", "--print_config"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "limit_val_batches: 1\n" in proc.stdout  # one batch, as written
    assert "args parameter is intended" not in proc.stderr, proc.stderr[-3000:]


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
    (saved,) = Path(tmp_path).rglob("config.yaml")  # written by rank 0, its int batch limit kept an int
    assert type(yaml.safe_load(saved.read_text())["trainer"]["limit_val_batches"]) is int


# --------------------------------------------------------------------------- a user's own classes
LIT = "tests.integration.projects.torchvision_style.LitClassifier"
CIFAR = "tests.integration.projects.torchvision_style.CIFARDataModule"
USER_TINY = ["--trainer.max_epochs=1", "--trainer.accelerator=cpu", "--trainer.logger=false",
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def test_fit_a_users_module_and_datamodule_with_a_defense_from_the_command_line(tmp_path, monkeypatch):
    from lightning_defense.callbacks import adversarial_training

    attacked, real = [], adversarial_training.pgd_attack

    def spy(model, x, y, eps, *args):
        adversarial = real(model, x, y, eps, *args)
        attacked.append((x, adversarial, eps))
        return adversarial

    monkeypatch.setattr(adversarial_training, "pgd_attack", spy)
    main(["fit", "--model", LIT, "--data", CIFAR, *USER_TINY, f"--trainer.default_root_dir={tmp_path}",
          "--trainer.callbacks+=lightning_defense.callbacks.AdversarialTraining", "--trainer.callbacks.steps=2"])
    assert len(attacked) == 3  # 48 samples, batch size 16: every batch attacked, in [0, 1] pixel space
    for pixels, adversarial, eps in attacked:
        assert pixels.min() >= 0 and pixels.max() <= 1 and pixels.min() < 0.1  # the user's Normalize undone
        assert 0 < (adversarial - pixels).abs().max() <= eps + 1e-6
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["model"]["class_path"] == LIT and config["data"]["class_path"] == CIFAR
    assert list(tmp_path.rglob("*.ckpt"))


def test_user_model_class_paths_and_links(tmp_path, capsys):
    from lightning_defense.cli.fit import model_class_path

    config = tmp_path / "fit.yaml"
    config.write_text(yaml.safe_dump({"model": {"class_path": LIT, "init_args": {"lr": 0.1}},
                                      "data": {"class_path": CIFAR}}))
    assert model_class_path(["fit", "--config", str(CONFIG)]) is None  # ImageClassifier's arguments
    assert model_class_path(["fit", "--config", str(config)]) == LIT
    assert model_class_path(["fit", "--config", str(config), "--model=my_pkg.Other"]) == "my_pkg.Other"
    assert model_class_path(["--model.class_path", "my_pkg.Other", "--model", "{lr: 1}"]) == "my_pkg.Other"
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"] == {"class_path": LIT, "init_args": {"lr": 0.1}}  # num_classes: linked

    # the data's num_classes/num_channels go only where the model takes them, and only where the data has them
    cli = build_cli(["--model", "lightning_defense.models.ImageClassifier", "--data",
                     "lightning_defense.datamodules.DigitsDataModule", "--data.image_size=8", *USER_TINY], run=False)
    assert cli.model.hparams.num_classes == 10 and cli.model.hparams.in_chans == 1
    cli = build_cli(["--model", LIT, "--model.num_classes=5", "--data", CIFAR, *USER_TINY], run=False)
    assert cli.model.hparams.num_classes == 5  # CIFARDataModule states no num_classes: the model's own stands
    with pytest.raises(ValueError, match="model.init_args.num_classes=5 disagrees with data.num_classes=10"):
        build_cli(["--model", LIT, "--model.num_classes=5", "--data", "lightning_defense.datamodules.DigitsDataModule",
                   *USER_TINY], run=False)


def test_certify_a_users_module_and_datamodule(tmp_path, capsys):
    config = tmp_path / "certify.yaml"
    config.write_text(yaml.safe_dump({
        "num_models": 6, "n0": 1, "alpha": 0.1, "progress_bar": False,
        "smoothing": {"class_path": "lightning_defense.datamodules.GaussianNoiseDataModule",
                      "init_args": {"sigma": 0.1}},
        "model": {"class_path": LIT, "init_args": {"lr": 0.05}},
        "data": {"class_path": CIFAR},
        "trainer": {"accelerator": "cpu", "max_epochs": 5},
    }))
    main(["certify", "--config", str(config), f"--output_dir={tmp_path / 'smooth'}"])
    out = capsys.readouterr().out
    assert "certify: sigma=0.1" in out and "16 test points" in out
    with open(tmp_path / "smooth" / "certificates.csv", newline="") as f:
        assert any(float(row["radius"]) > 0 and row["correct"] == "1" for row in csv.DictReader(f))

    main(["certify", "--model", LIT, "--data", CIFAR, "--mode=dpa", "--smoothing=null", "--num_models=3",
          "--trainer.accelerator=cpu", "--trainer.max_epochs=1", "--progress_bar=false", "--num_classes=3",
          f"--output_dir={tmp_path / 'dpa'}"])
    assert "DPA, k=3 partitions" in capsys.readouterr().out


def test_certify_with_the_fast_recipe_by_class_path_trains_groups(tmp_path, capsys):
    """FastImageClassifier on the command line is one of the loop's recipes: several at once, linked to the data."""
    main(["certify", "--model", "lightning_defense.models.FastImageClassifier",
          "--model.backbone_kwargs={widths: [8, 16, 16]}", "--model.flip=false", "--data",
          "lightning_defense.datamodules.DigitsDataModule", "--data.image_size=8", "--num_models=4", "--n0=1",
          "--num_test_points=10", "--trainer.accelerator=cpu", "--trainer.max_epochs=1",
          "--trainer.limit_train_batches=2", "--trainer.models_per_batch=2", "--progress_bar=false",
          f"--output_dir={tmp_path}"])
    assert "m=4" in capsys.readouterr().out
    key = json.loads((tmp_path / "votes" / "key.json").read_text())
    assert key["model"]["class_path"] == "lightning_defense.models.fast.FastImageClassifier"
    assert "num_classes" not in key["model"]["init_args"]  # from the data (1 channel, 10 classes), not the defaults

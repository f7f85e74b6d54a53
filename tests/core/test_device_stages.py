"""Every data and certification stage takes its device from core.device.resolve_device (the attack stages are
covered in tests/attacks/test_device.py)."""

import pytest
import torch

from lightning_defense.certify import TrainingOptions, run_certification
from lightning_defense.core.device import record_devices
from lightning_defense.datamodules import DiffusionPurifiedDataModule, DigitsDataModule
from lightning_defense.datamodules.deep_knn import DeepKNNFilterDataModule
from tests.datamodules.test_eclipse import eclipse, small_digits
from tests.diffusion._tiny import save_tiny_ddpm


def digits():
    return DigitsDataModule(image_size=8, val_fraction=0.05, test_fraction=0.85, batch_size=32, seed=0)


def test_purification_deep_knn_eclipse_and_certification_resolve_their_device(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "auto" must come out as the CPU here
    with record_devices() as log:
        purified = DiffusionPurifiedDataModule(digits(), save_tiny_ddpm(tmp_path / "ddpm"), sigma=0.25,
                                               cache_dir=str(tmp_path / "c"), progress=False)
        purified.prepare_data()
        DeepKNNFilterDataModule(digits(), k=5, epochs=1).setup("fit")
        eclipse(tmp_path, small_digits()).setup("fit")
        run_certification(digits(), model={"backbone": "small_cnn", "backbone_kwargs": {"width": 4}},
                          sigma=0.25, num_models=2, n0=1, training=TrainingOptions(max_epochs=1, accelerator="cpu"),
                          output_dir=str(tmp_path / "cert"), progress_bar=False)
    stages = log.stages()
    for stage in ("diffusion.purify", "deep_knn.feature_model", "eclipse.train_diffusion", "certify.train"):
        assert stages.get(stage) == torch.device("cpu"), (stage, stages)


@pytest.mark.parametrize("make", [
    lambda tmp: DiffusionPurifiedDataModule(digits(), str(tmp), device="tpu"),
    lambda tmp: DeepKNNFilterDataModule(digits(), device="gpu0"),
])
def test_a_device_setting_that_is_no_device_is_refused_when_built(make, tmp_path):
    with pytest.raises(ValueError, match="'cuda:<index>'"):
        make(tmp_path)

import pytest
import torch
from diffusers import DDPMScheduler

from lightning_defense.diffusion.denoiser import Denoiser, load_denoiser
from tests.diffusion._tiny import save_tiny_ddpm, tiny_unet


def test_loads_a_pipeline_directory_and_a_flat_one_identically(tmp_path):
    pipeline_dir = save_tiny_ddpm(tmp_path / "pipeline")
    assert (tmp_path / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    denoiser = load_denoiser(pipeline_dir)
    flat = tmp_path / "flat"
    denoiser.unet.save_pretrained(flat, safe_serialization=True)
    denoiser.scheduler.save_pretrained(flat)
    again = load_denoiser(str(flat))
    assert again.fingerprint() == denoiser.fingerprint()
    assert len(denoiser.alphas_cumprod) == 100 and denoiser.in_channels == 1 and denoiser.sample_size == 8
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(denoiser(x, torch.tensor([3, 4])), again(x, torch.tensor([3, 4])))


def test_fingerprint_changes_with_any_weight():
    a = Denoiser(tiny_unet(seed=0), DDPMScheduler(100))
    b = Denoiser(tiny_unet(seed=0), DDPMScheduler(100))
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        next(b.unet.parameters()).view(-1)[0] += 1e-6
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() != Denoiser(tiny_unet(seed=0), DDPMScheduler(200)).fingerprint()


def test_missing_directory_names_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does-not-exist.*does not exist.*google/ddpm-cifar10-32"):
        load_denoiser(str(tmp_path / "does-not-exist"))


def test_directory_without_safetensors_is_refused(tmp_path):
    denoiser = load_denoiser(save_tiny_ddpm(tmp_path / "m"))
    pickled = tmp_path / "pickled"
    denoiser.unet.save_pretrained(pickled, safe_serialization=False)  # diffusion_pytorch_model.bin only
    denoiser.scheduler.save_pretrained(pickled)
    with pytest.raises(FileNotFoundError, match=r"(?s)could not load a diffusers DDPM.*safetensors only"):
        load_denoiser(str(pickled))


def test_inconsistent_models_are_refused():
    with pytest.raises(ValueError, match="prediction_type must be 'epsilon'"):
        Denoiser(tiny_unet(), DDPMScheduler(100, prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="'learned_range' UNet with 1 input channels needs 2 output channels"):
        Denoiser(tiny_unet(), DDPMScheduler(100, variance_type="learned_range"))


@pytest.mark.parametrize("asset, size", [("digits_ddpm", 16), ("digits_ddpm_8x8", 8)])
def test_shipped_digits_denoisers_remove_most_of_the_noise(asset, size):
    """The shipped DDPMs denoise held-out digits (the validation split, never trained on) in one step."""
    from pathlib import Path

    from lightning_defense.datamodules import DigitsDataModule
    from lightning_defense.core.rng import per_sample_normal
    from lightning_defense.diffusion import noise_and_denoise, timestep_for_sigma

    denoiser = load_denoiser(str(Path(__file__).resolve().parents[2] / "lightning_defense" / "assets" / asset))
    assert denoiser.sample_size == size and denoiser.in_channels == 1
    dm = DigitsDataModule(image_size=size, seed=0)
    dm.setup("fit")
    images, indices = dm.val_set.images, torch.arange(len(dm.val_set))
    sigma = 0.25
    t_star = timestep_for_sigma(denoiser.alphas_cumprod, sigma, log=False)
    with torch.inference_mode():
        denoised = noise_and_denoise(denoiser, images, indices, denoiser.alphas_cumprod, t_star, sigma, seed=0)
    noisy = images + sigma * per_sample_normal(0, indices, tuple(images.shape[1:]))
    rmse = lambda x: float((x - images).pow(2).mean().sqrt())  # noqa: E731
    assert rmse(noisy) > 0.2  # the Gaussian noise the denoiser starts from
    assert rmse(denoised) < 0.5 * rmse(noisy)  # measured: 0.28x at 16x16, 0.44x at 8x8


def test_mistyped_local_path_under_an_existing_directory_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    with pytest.raises(FileNotFoundError, match="denoiser directory 'weights/ddpm-cifar10-32' does not exist"):
        load_denoiser("weights/ddpm-cifar10-32")


def test_hub_id_offline_fails_fast_and_names_the_fix(tmp_path, monkeypatch):
    import time

    from lightning_defense.diffusion import denoiser as module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1") as error:
        load_denoiser("google/ddpm-cifar10-32")
    assert "local directory" in str(error.value) and time.monotonic() - start < 20
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(module, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(FileNotFoundError, match="no network to reach the Hugging Face hub"):
        load_denoiser("google/ddpm-cifar10-32")


def test_a_run_loads_and_fingerprints_the_denoiser_once(tmp_path, monkeypatch):
    from lightning_defense.diffusion import denoiser as module

    directory = save_tiny_ddpm(tmp_path / "m")
    first = load_denoiser(directory)
    assert load_denoiser(directory) is first  # the same source, unchanged on disk: no second read
    calls = []
    real = module.Denoiser._hash
    monkeypatch.setattr(module.Denoiser, "_hash", lambda self, state: calls.append(1) or real(self, state))
    key = first.fingerprint()
    assert first.fingerprint() == key and len(calls) == 1
    with torch.no_grad():
        next(first.unet.parameters()).add_(1.0)  # weights changed in place: the fingerprint follows
    assert first.fingerprint() != key and len(calls) == 2
    save_tiny_ddpm(tmp_path / "m", seed=1)  # rewritten on disk: read again
    assert load_denoiser(directory) is not first


def test_shipped_fashion_mnist_denoiser_removes_most_of_the_noise():
    """The shipped Fashion-MNIST DDPM (configs/fashion_mnist/train_denoiser.yaml) denoises real test images."""
    from pathlib import Path

    from lightning_defense.core.rng import per_sample_normal
    from lightning_defense.datamodules import FashionMNISTDataModule
    from lightning_defense.diffusion import noise_and_denoise, timestep_for_sigma

    denoiser = load_denoiser(str(Path(__file__).resolve().parents[2] / "lightning_defense" / "assets"
                                 / "fashion_mnist_ddpm_14x14"))
    assert denoiser.sample_size == 14 and denoiser.in_channels == 1
    dm = FashionMNISTDataModule(image_size=14)
    dm.setup("test")
    images = dm.test_set.tensors()[0][:200]
    indices, sigma = torch.arange(len(images)), 0.25
    t_star = timestep_for_sigma(denoiser.alphas_cumprod, sigma, log=False)
    with torch.inference_mode():
        denoised = noise_and_denoise(denoiser, images, indices, denoiser.alphas_cumprod, t_star, sigma, seed=0)
    noisy = images + sigma * per_sample_normal(0, indices, tuple(images.shape[1:]))
    rmse = lambda x: float((x - images).pow(2).mean().sqrt())  # noqa: E731
    assert rmse(noisy) > 0.2 and rmse(denoised) < 0.4 * rmse(noisy)  # measured: 0.07 against 0.25

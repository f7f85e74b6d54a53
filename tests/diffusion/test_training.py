import math
from pathlib import Path

import pytest
import torch

from lightning_defense.cli import main
from lightning_defense.diffusion import DiffusionModel, load_denoiser, noise_and_denoise, timestep_for_sigma
from lightning_defense.diffusion.training import vlb_bits_per_dim

TINY = dict(sample_size=8, in_channels=1, block_out_channels=(16, 32), layers_per_block=1)


def test_vlb_term_vanishes_for_the_true_noise_and_posterior_variance():
    model = DiffusionModel(**TINY, num_train_timesteps=50, learn_variance=True)
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([1, 5, 10, 25, 49, 3])
    a = model.abar[t].view(-1, 1, 1, 1).float()
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    args = (x0, x_t, t, model.abar, model.abar_prev, model.log_beta_tilde)
    exact = vlb_bits_per_dim(noise, -torch.ones_like(x0), *args)  # v = -1: the posterior variance
    assert exact.abs().max() < 1e-5
    wrong_var = vlb_bits_per_dim(noise, torch.ones_like(x0), *args)  # v = +1: beta_t
    wrong_eps = vlb_bits_per_dim(noise + 0.1, -torch.ones_like(x0), *args)
    assert (wrong_var > 1e-4).all() and (wrong_eps > 1e-4).all()
    # t = 0 is the decoder's negative log-likelihood: positive, and smaller for the right mean
    t0 = torch.zeros(6, dtype=torch.long)
    a0 = model.abar[t0].view(-1, 1, 1, 1).float()
    x_1 = a0.sqrt() * x0 + (1 - a0).sqrt() * noise
    args0 = (x0, x_1, t0, model.abar, model.abar_prev, model.log_beta_tilde)
    nll_right, nll_wrong = vlb_bits_per_dim(noise, -torch.ones_like(x0), *args0), vlb_bits_per_dim(-noise, -torch.ones_like(x0), *args0)
    assert (nll_right > 0).all() and (nll_right < nll_wrong).all()


def test_hybrid_loss_adds_the_weighted_vlb():
    model = DiffusionModel(**TINY, num_train_timesteps=100, learn_variance=True, vlb_weight=0.01)
    losses = model.diffusion_loss(torch.rand(4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    assert model.unet.config.out_channels == 2 and model.scheduler.config.variance_type == "learned_range"
    expected = losses["simple"] + 0.01 * 100 * losses["vlb"]
    assert torch.allclose(losses["loss"], expected) and losses["vlb"] > 0


def test_cosine_schedule_option_is_nichol_and_dhariwal_s():
    model = DiffusionModel(**TINY, num_train_timesteps=4000, beta_schedule="squaredcos_cap_v2")
    assert timestep_for_sigma(model.scheduler.alphas_cumprod, 0.25) == 1158  # REFERENCE.md's value
    s = 0.008
    f = lambda t: math.cos((t / 4000 + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert float(model.scheduler.alphas_cumprod[999]) == pytest.approx(f(1000) / f(0), rel=1e-4)


def test_training_lowers_the_eps_prediction_error():
    torch.manual_seed(0)
    model = DiffusionModel(**TINY, num_train_timesteps=100, ema_decay=0.0)
    images = torch.rand(8, 1, 8, 8).round()  # binary pixels: easy to learn
    def held_out_error():
        with torch.no_grad():
            return float(model.diffusion_loss(images, generator=torch.Generator().manual_seed(1))["simple"])
    before = held_out_error()
    optimizer = torch.optim.AdamW(model.unet.parameters(), lr=5e-3)
    for _ in range(10):
        optimizer.zero_grad()
        model.diffusion_loss(images)["loss"].backward()
        optimizer.step()
    assert held_out_error() < 0.85 * before


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="beta_schedule must be 'linear' or 'squaredcos_cap_v2'"):
        DiffusionModel(**TINY, beta_schedule="cosine")
    with pytest.raises(ValueError, match="sample_size must be >= 4 and divisible by 2"):
        DiffusionModel(**{**TINY, "sample_size": 9})
    with pytest.raises(ValueError, match="ema_decay must be in"):
        DiffusionModel(**TINY, ema_decay=1.0)
    model = DiffusionModel(**TINY)
    with pytest.raises(ValueError, match=r"got images shaped \(3, 8, 8\); set in_channels/sample_size"):
        model.training_step((torch.rand(2, 3, 8, 8), torch.zeros(2), torch.arange(2)), 0)


def test_train_denoiser_command_writes_a_model_that_loads_like_an_off_the_shelf_one(tmp_path):
    out = tmp_path / "ddpm"
    main([
        "train-denoiser", "--config", str(Path(__file__).resolve().parents[2] / "configs/digits/train_denoiser.yaml"),
        f"--output_dir={out}", "--trainer.max_epochs=2", "--trainer.limit_train_batches=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=true",
        f"--trainer.default_root_dir={tmp_path}", "--model.sample_size=8", "--model.block_out_channels=[16, 32]",
        "--model.num_train_timesteps=100", "--model.beta_schedule=squaredcos_cap_v2", "--model.learn_variance=true",
        "--data.init_args.image_size=8", "--data.init_args.batch_size=16",
    ])
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(out.rglob("*.bin"))
    # limit_train_batches=1 is one batch an epoch (the parser alone makes it 1.0: all 79 of them)
    assert [p.name for p in tmp_path.rglob("*.ckpt")] == ["epoch=1-step=2.ckpt"]
    denoiser = load_denoiser(str(out))
    assert denoiser.variance_type == "learned_range" and denoiser.unet.config.out_channels == 2
    assert denoiser.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    images = torch.rand(3, 1, 8, 8)
    with torch.inference_mode():
        out_images = noise_and_denoise(denoiser, images, torch.arange(3), denoiser.alphas_cumprod, 20, 0.1, 0, steps=3,
                                       variance_type=denoiser.variance_type)
    assert out_images.shape == images.shape and torch.isfinite(out_images).all()

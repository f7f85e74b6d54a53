import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from lightning_defense.core.rng import per_sample_normal
from lightning_defense.diffusion.denoise import (
    denoise_one_step,
    noise_and_denoise,
    posterior,
    reverse_process,
    reverse_timesteps,
    sigma_at_timestep,
    timestep_for_sigma,
)


def linear_schedule(T=1000):
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)  # Ho et al.'s linear schedule
    return torch.from_numpy(np.cumprod(1.0 - betas))


@pytest.mark.parametrize("sigma, expected", [(0.01, 3), (0.1, 58), (0.25, 145), (0.5, 259), (1.0, 396)])
def test_timestep_for_sigma_on_linear_schedule(sigma, expected):
    abar = linear_schedule()
    t = timestep_for_sigma(abar, sigma)
    assert t == expected
    ratio = lambda k: math.sqrt((1 - float(abar[k])) / float(abar[k]))  # noqa: E731
    assert ratio(t - 1) < 2 * sigma <= ratio(t)  # the smallest such t
    assert sigma_at_timestep(abar, t - 1) < sigma <= sigma_at_timestep(abar, t)


def test_timestep_for_sigma_reproduces_the_reference_cosine_values():
    # REFERENCE.md: improved-diffusion's 4000-step cosine schedule; diffusers' squaredcos_cap_v2 is the same.
    abar = DDPMScheduler(num_train_timesteps=4000, beta_schedule="squaredcos_cap_v2").alphas_cumprod
    assert [timestep_for_sigma(abar, s) for s in (0.1, 0.25, 0.5, 1.0)] == [475, 1158, 1984, 2809]


def test_sigma_below_the_first_noise_level_warns_that_nothing_is_purified(recwarn):
    abar = linear_schedule()  # sigma at t=0 is sqrt(1e-4 / (1 - 1e-4)) / 2 ~ 0.005
    with pytest.warns(UserWarning, match=r"sigma=1e-09 is at or below the schedule's first noise level \(sigma 0.005.* "
                                         r"at t=0\), so t\*=0.*returned nearly unchanged"):
        assert timestep_for_sigma(abar, 1e-9) == 0
    recwarn.clear()
    assert timestep_for_sigma(abar, 0.01) == 3
    assert not [w for w in recwarn if "first noise level" in str(w.message)]  # t* > 0: no warning


def test_unreachable_and_bad_sigma_are_clear_errors():
    abar = linear_schedule(100)
    with pytest.raises(ValueError, match=r"sigma=5.0 is out of reach.*largest pixel-space sigma it reaches is 0.66"):
        timestep_for_sigma(abar, 5.0)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        timestep_for_sigma(abar, 0.0)
    with pytest.raises(ValueError, match="timestep must be in"):
        sigma_at_timestep(abar, 100)


def oracle_for(x0, abar):
    """The ideal eps-predictor: it knows the clean images and returns the noise actually in x_t."""

    def eps_model(x_t, t):
        a = abar[t].to(x_t).view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    return eps_model


def test_single_step_with_an_oracle_gives_back_the_clean_image():
    abar = linear_schedule()
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    t = timestep_for_sigma(abar, 0.5, log=False)
    a = float(abar[t])
    x_t = math.sqrt(a) * (x0 + 2 * 0.5 * torch.randn_like(x0))
    assert (x_t / math.sqrt(a) - x0).abs().max() > 1.0  # the noise is large
    assert torch.allclose(denoise_one_step(oracle_for(x0, abar), x_t, t, a), x0, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 4])
def test_noise_and_denoise_with_an_oracle_returns_the_clean_images(steps):
    abar = linear_schedule()
    images = torch.rand(5, 1, 8, 8)
    indices = torch.tensor([3, 9, 0, 4, 7])
    t = timestep_for_sigma(abar, 0.25, log=False)
    out = noise_and_denoise(oracle_for(images * 2 - 1, abar), images, indices, abar, t, 0.25, seed=1, steps=steps)
    assert torch.allclose(out, images, atol=1e-5)


def test_noisy_input_is_the_gaussian_only_data_rescaled_to_t_star():
    abar = linear_schedule()
    images, indices, sigma, seed = torch.rand(3, 1, 8, 8), torch.tensor([5, 1, 2]), 0.25, 7
    t = timestep_for_sigma(abar, sigma, log=False)
    seen = {}

    def recording(x_t, tt):
        seen["x_t"], seen["t"] = x_t.clone(), tt.clone()
        return torch.zeros_like(x_t)

    out = noise_and_denoise(recording, images, indices, abar, t, sigma, seed)
    gaussian_only = images + sigma * per_sample_normal(seed, indices, (1, 8, 8))  # GaussianNoiseDataModule's data
    assert torch.allclose(seen["x_t"], math.sqrt(float(abar[t])) * (2 * gaussian_only - 1), atol=1e-5)
    assert seen["t"].tolist() == [t] * 3
    # eps = 0 means x0_hat = x_t / sqrt(abar) = 2 * gaussian_only - 1, clipped, back in [0, 1]
    assert torch.allclose(out, gaussian_only.clamp(0, 1), atol=1e-5)


def test_reverse_process_calls_the_model_once_per_timestep_and_its_noise_is_keyed_per_sample():
    abar = linear_schedule()
    assert reverse_timesteps(100, 1) == [100]
    assert reverse_timesteps(100, 101) == list(range(100, -1, -1))
    assert reverse_timesteps(100, 5) == [100, 75, 50, 25, 0]
    with pytest.raises(ValueError, match="steps must be at most t\\*\\+1 = 11"):
        reverse_timesteps(10, 12)
    calls = []

    def zero_eps(x_t, t):
        calls.append(int(t[0]))
        return torch.zeros_like(x_t)

    images = torch.rand(4, 1, 8, 8)
    full = noise_and_denoise(zero_eps, images, torch.arange(4), abar, 100, 0.1, seed=3, steps=5)
    assert calls == [100, 75, 50, 25, 0]
    part = noise_and_denoise(zero_eps, images[2:], torch.arange(2, 4), abar, 100, 0.1, seed=3, steps=5)
    assert torch.equal(part, full[2:])  # independent of the batch it runs in


def test_learned_range_variance_interpolates_between_the_fixed_ones():
    x0, x_t = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    abar_t, abar_prev = 0.5, 0.6
    _, small = posterior(x0, x_t, abar_t, abar_prev, "fixed_small")
    _, large = posterior(x0, x_t, abar_t, abar_prev, "fixed_large")
    beta = 1 - abar_t / abar_prev
    assert torch.allclose(large, torch.full_like(large, math.log(beta)))
    assert torch.allclose(small, torch.full_like(small, math.log(beta * (1 - abar_prev) / (1 - abar_t))))
    for v, expected in ((-1.0, small), (1.0, large), (0.0, (small + large) / 2)):
        _, learned = posterior(x0, x_t, abar_t, abar_prev, "learned_range", torch.full_like(x_t, v))
        assert torch.allclose(learned, expected)


def test_learned_range_output_is_split_into_eps_and_v():
    abar = linear_schedule()
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    oracle = oracle_for(x0, abar)
    two_channel = lambda x, t: torch.cat([oracle(x, t), torch.zeros_like(x)], 1)  # noqa: E731
    x_t = math.sqrt(float(abar[50])) * (x0 + 0.3 * torch.randn_like(x0))
    out = reverse_process(two_channel, x_t, [50, 20, 0], abar, "learned_range", step_noise=lambda i: torch.randn_like(x0))
    assert torch.allclose(out, x0, atol=1e-4)
    with pytest.raises(ValueError, match="returned 3 channels for 1-channel images"):
        denoise_one_step(lambda x, t: torch.zeros(2, 3, 8, 8), x_t, 50, float(abar[50]))


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("inference_steps", [1000, 50])  # consecutive and strided timesteps
def test_posterior_step_equals_diffusers_ddpm_step(variance_type, inference_steps):
    """One reverse step, mean and variance, against diffusers' own DDPMScheduler.step (x0 given as the model output).

    The reverse-process tests with an oracle model return x0 at the last step whatever came before; this
    checks the posterior itself, at a step in the middle of the chain.
    """
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                              clip_sample=False, variance_type=variance_type)
    scheduler.set_timesteps(inference_steps)
    t = int(scheduler.timesteps[len(scheduler.timesteps) // 2])
    prev = int(scheduler.previous_timestep(t))
    x0, x_t = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8)
    expected = scheduler.step(x0, t, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
    abar = scheduler.alphas_cumprod
    mean, log_var = posterior(x0, x_t, float(abar[t]), float(abar[prev]), variance_type)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(mean + (0.5 * log_var).exp() * noise, expected, atol=1e-5)

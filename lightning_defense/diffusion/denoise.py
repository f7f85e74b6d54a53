"""Noise and denoise with a DDPM: Hong, Carlini & Kurakin's Pseudocode 1 (GETTIMESTEP, NOISEANDDENOISE).

Images live in [0, 1]; the diffusion model works in [-1, 1], so a pixel-space noise std ``sigma`` is
``2 * sigma`` in model space (Carlini et al., "(Certified!!) Adversarial Robustness for Free!").

* :func:`timestep_for_sigma` is GETTIMESTEP: the smallest t whose noise-to-signal ratio
  ``sqrt((1 - abar_t) / abar_t)`` reaches ``2 * sigma``.
* :func:`add_noise` gives ``x_t = sqrt(abar_t) * (x + 2 * sigma * eps)``: the pixel-space Gaussian
  ``x + sigma * eps`` (the RAB "Gaussian-only" data) rescaled to the model's input at t.
* :func:`denoise_one_step` is the single-step estimate
  ``x0_hat = (x_t - sqrt(1 - abar_t) * eps_theta(x_t, t)) / sqrt(abar_t)``, clipped to [-1, 1].
* :func:`reverse_process` runs the DDPM ancestral sampler from t* to 0 in ``steps`` model calls; with
  ``steps=1`` it is exactly :func:`denoise_one_step`. It supports the fixed and the learned-range
  variances (Nichol & Dhariwal), which ECLIPSE uses.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_defense.core.rng import per_sample_normal

#: ``eps_model(x_t, t)`` returns the model's output: eps (C channels), or eps and the variance
#: interpolation v (2C channels) for a learned-range model.
EpsModel = Callable[[Tensor, Tensor], Tensor]
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned_range")


def noise_to_signal(alphas_cumprod: Tensor) -> Tensor:
    """``sqrt((1 - abar_t) / abar_t)`` for every t, in float64."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return ((1.0 - abar) / abar).sqrt()


def sigma_at_timestep(alphas_cumprod: Tensor, timestep: int) -> float:
    """The pixel-space sigma that timestep t corresponds to: ``sqrt((1 - abar_t) / abar_t) / 2``."""
    ratio = noise_to_signal(alphas_cumprod)
    if not 0 <= timestep < len(ratio):
        raise ValueError(f"timestep must be in [0, {len(ratio) - 1}] for this schedule; got {timestep}")
    return float(ratio[timestep]) / 2.0


def timestep_for_sigma(alphas_cumprod: Tensor, sigma: float, log: bool = True) -> int:
    """GETTIMESTEP: the smallest t with ``sqrt((1 - abar_t) / abar_t) >= 2 * sigma``.

    Args:
        alphas_cumprod: The schedule's ``abar_t``, t = 0..T-1 (``scheduler.alphas_cumprod``).
        sigma: Noise std in [0, 1] pixel units.
        log: Log the chosen t* and the sigma it gives.

    Warns when t* = 0 (``sigma`` at or below the schedule's first noise level): the data then comes back
    nearly unchanged.

    Raises:
        ValueError: ``sigma`` is not positive, or larger than the schedule can reach.

    Example::

        t_star = timestep_for_sigma(DDPMScheduler(4000, beta_schedule="squaredcos_cap_v2").alphas_cumprod, 0.25)
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 (noise std in [0,1] pixel units); got {sigma}")
    ratio = noise_to_signal(alphas_cumprod)
    reached = torch.nonzero(ratio >= 2.0 * sigma)
    if len(reached) == 0:
        max_sigma = float(ratio[-1]) / 2.0
        raise ValueError(
            f"sigma={sigma} is out of reach of this {len(ratio)}-step schedule: the largest pixel-space sigma "
            f"it reaches is {max_sigma:.4g} (at t={len(ratio) - 1}); use a smaller sigma or a longer schedule"
        )
    t_star = int(reached[0])
    if t_star == 0:
        warn_no_purification(sigma, float(ratio[0]) / 2.0)
    if log:
        rank_zero_info(
            f"diffusion denoising: sigma={sigma} -> t*={t_star} of {len(ratio)} "
            f"(the schedule's sigma at t* is {float(ratio[t_star]) / 2.0:.4f})"
        )
    return t_star


def warn_no_purification(sigma: float, first_sigma: float) -> None:
    """Warn (rank zero) that t* = 0: denoising from the schedule's first step leaves the data nearly unchanged."""
    rank_zero_warn(
        f"diffusion denoising: sigma={sigma:g} is at or below the schedule's first noise level (sigma {first_sigma:.4g} "
        "at t=0), so t*=0: there is no purification to speak of and the data is returned nearly unchanged. Use a "
        "larger sigma (Hong et al. use 0.1 to 1.0)"
    )


def to_model_space(images: Tensor) -> Tensor:
    """[0, 1] pixels -> [-1, 1] model space."""
    return images * 2.0 - 1.0


def to_pixel_space(x: Tensor) -> Tensor:
    """[-1, 1] model space -> [0, 1] pixels, clipped."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def add_noise(x: Tensor, noise: Tensor, sigma: float, abar_t: float) -> Tensor:
    """``x_t = sqrt(abar_t) * (x + 2 * sigma * noise)`` for model-space ``x`` and standard normal ``noise``."""
    return math.sqrt(abar_t) * (x + 2.0 * sigma * noise)


def denoise_one_step(eps_model: EpsModel, x_t: Tensor, t: int, abar_t: float) -> Tensor:
    """Single-step denoising: ``(x_t - sqrt(1 - abar_t) * eps_theta(x_t, t)) / sqrt(abar_t)``, clipped to [-1, 1]."""
    eps = _split_output(eps_model(x_t, _timesteps(t, x_t)), x_t.shape[1])[0]
    return _x0_from_eps(x_t, eps, abar_t)


def reverse_timesteps(t_star: int, steps: int) -> list[int]:
    """The ``steps`` timesteps the reverse process visits, from t* down to 0, evenly spaced."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    if steps > t_star + 1:
        raise ValueError(f"steps must be at most t*+1 = {t_star + 1} (one model call per timestep); got {steps}")
    if steps == 1:
        return [t_star]
    return sorted({round(t_star - i * t_star / (steps - 1)) for i in range(steps)}, reverse=True)


def reverse_process(
    eps_model: EpsModel,
    x_t: Tensor,
    timesteps: list[int],
    alphas_cumprod: Tensor,
    variance_type: str = "fixed_small",
    step_noise: Optional[Callable[[int], Tensor]] = None,
) -> Tensor:
    """DDPM ancestral sampling from ``timesteps[0]`` down to x0; returns x0 in [-1, 1].

    Each step predicts x0 (clipped), then samples ``x_prev ~ N(mu_tilde(x_t, x0_hat), var)`` of the
    posterior ``q(x_prev | x_t, x0)``, with ``beta_t = 1 - abar_t / abar_prev`` for strided steps. The
    last step (to x0) is noise-free, so one step is single-step denoising.

    Args:
        eps_model: ``eps_model(x_t, t)``; 2C output channels for ``variance_type="learned_range"``.
        x_t: Model-space noisy images at ``timesteps[0]``.
        timesteps: Strictly decreasing timesteps (see :func:`reverse_timesteps`).
        alphas_cumprod: The schedule's ``abar_t``.
        variance_type: ``fixed_small`` (posterior variance), ``fixed_large`` (beta_t) or ``learned_range``
            (log-variance interpolated between the two by the model's v output).
        step_noise: ``step_noise(i)`` gives the standard normal noise of step i (1-based among the
            noisy steps); required when more than one step is taken.
    """
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}; got {variance_type!r}")
    if any(a <= b for a, b in zip(timesteps, timesteps[1:])) or timesteps[-1] < 0:
        raise ValueError(f"timesteps must be strictly decreasing and >= 0; got {timesteps}")
    if len(timesteps) > 1 and step_noise is None:
        raise ValueError("step_noise is required for a reverse process of more than one step")
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    channels = x_t.shape[1]
    x = x_t
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        abar_t, abar_prev = float(abar[t]), (float(abar[prev]) if prev >= 0 else 1.0)
        eps, v = _split_output(eps_model(x, _timesteps(t, x)), channels)
        x0 = _x0_from_eps(x, eps, abar_t)
        if prev < 0:
            return x0
        mean, log_var = posterior(x0, x, abar_t, abar_prev, variance_type, v)
        x = mean + (0.5 * log_var).exp() * step_noise(i + 1).to(x)
    return x


def noise_and_denoise(
    eps_model: EpsModel,
    images: Tensor,
    indices: Tensor,
    alphas_cumprod: Tensor,
    t_star: int,
    sigma: float,
    seed: int,
    steps: int = 1,
    variance_type: str = "fixed_small",
) -> Tensor:
    """NOISEANDDENOISE for a batch: ``[0,1]`` images -> purified ``[0,1]`` images.

    The noise of each image is keyed by ``(seed, index)`` (:func:`per_sample_normal`; stream i for reverse
    step i), so the result depends neither on the batch nor on the number of processes. The noisy data
    is the Gaussian-only ``x + sigma * eps`` of :class:`GaussianNoiseDataModule`, rescaled to t*.

    Args:
        eps_model: ``eps_model(x_t, t)``, e.g. a :class:`~lightning_defense.diffusion.Denoiser`.
        images: (N, C, H, W) in [0, 1], on the model's device.
        indices: (N,) each image's index in its split.
        alphas_cumprod: The schedule's ``abar_t``.
        t_star: The starting timestep (:func:`timestep_for_sigma`).
        sigma: Pixel-space noise std; ``2 * sigma <= sqrt((1 - abar) / abar)`` at t*.
        seed: The noise draw.
        steps: Model calls: 1 is Hong et al.'s single-step denoising, more runs the reverse process.
        variance_type: The reverse process's variance (see :func:`reverse_process`).
    """
    shape = tuple(images.shape[1:])
    noise = per_sample_normal(seed, indices.cpu(), shape).to(images)
    abar_t = float(torch.as_tensor(alphas_cumprod, dtype=torch.float64)[t_star])
    x_t = add_noise(to_model_space(images), noise, sigma, abar_t)
    x0 = reverse_process(
        eps_model,
        x_t,
        reverse_timesteps(t_star, steps),
        alphas_cumprod,
        variance_type,
        step_noise=lambda i: per_sample_normal(seed, indices.cpu(), shape, stream=i),
    )
    return to_pixel_space(x0)


def posterior(
    x0: Tensor,
    x_t: Tensor,
    abar_t: float | Tensor,
    abar_prev: float | Tensor,
    variance_type: str = "fixed_small",
    v: Optional[Tensor] = None,
    log_small: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Mean and log-variance of the reverse step ``p(x_prev | x_t)`` given the x0 estimate.

    The mean is that of ``q(x_prev | x_t, x0)`` (DDPM eq. 7). The log-variance is the posterior's
    ``log beta_tilde`` (``fixed_small``), ``log beta_t`` (``fixed_large``) or, for ``learned_range``,
    ``frac * log beta_t + (1 - frac) * log beta_tilde`` with ``frac = (v + 1) / 2`` (Nichol & Dhariwal eq. 15).
    ``abar_t`` and ``abar_prev`` are floats or tensors broadcastable to ``x_t`` (per-sample timesteps);
    ``log_small`` overrides ``log beta_tilde`` (training clips it at t=0, where beta_tilde is 0).
    """
    abar_t = torch.as_tensor(abar_t, dtype=torch.float64, device=x_t.device)
    abar_prev = torch.as_tensor(abar_prev, dtype=torch.float64, device=x_t.device)
    beta_t = 1.0 - abar_t / abar_prev
    coef_x0 = (abar_prev.sqrt() * beta_t / (1.0 - abar_t)).to(x_t.dtype)
    coef_xt = ((1.0 - beta_t).sqrt() * (1.0 - abar_prev) / (1.0 - abar_t)).to(x_t.dtype)
    mean = coef_x0 * x0 + coef_xt * x_t
    if log_small is None:
        beta_tilde = beta_t * (1.0 - abar_prev) / (1.0 - abar_t)
        log_small = beta_tilde.clamp_min(1e-20).log()
    log_small = torch.as_tensor(log_small, device=x_t.device).to(x_t.dtype).expand_as(mean)
    log_large = beta_t.log().to(x_t.dtype).expand_as(mean)
    if variance_type.startswith("fixed_small"):
        return mean, log_small
    if variance_type.startswith("fixed_large"):
        return mean, log_large
    if v is None:
        raise ValueError("variance_type='learned_range' needs the model's variance output v (2C output channels)")
    frac = (v + 1.0) / 2.0
    return mean, frac * log_large + (1.0 - frac) * log_small


def _x0_from_eps(x_t: Tensor, eps: Tensor, abar_t: float) -> Tensor:
    return ((x_t - math.sqrt(1.0 - abar_t) * eps) / math.sqrt(abar_t)).clamp(-1.0, 1.0)


def _split_output(output: Tensor, channels: int) -> tuple[Tensor, Optional[Tensor]]:
    if output.shape[1] == channels:
        return output, None
    if output.shape[1] == 2 * channels:
        return output[:, :channels], output[:, channels:]
    raise ValueError(
        f"the denoiser returned {output.shape[1]} channels for {channels}-channel images; expected {channels} "
        f"(eps) or {2 * channels} (eps and learned variance)"
    )


def _timesteps(t: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)

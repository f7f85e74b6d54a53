"""Diffusion models for purification: loading a DDPM, Hong et al.'s noise-and-denoise, training a denoiser.

* :mod:`~lightning_defense.diffusion.denoise`: GETTIMESTEP, single-step denoising, the reverse process.
* :mod:`~lightning_defense.diffusion.denoiser`: :class:`Denoiser` and :func:`load_denoiser` (diffusers format).
* :mod:`~lightning_defense.diffusion.training`: :class:`DiffusionModel`, the ``train-denoiser`` command.
* :mod:`~lightning_defense.diffusion.sparse`: ECLIPSE's sparse-set DDPM, :class:`SparseDenoiserBuilder`.

The purifying datamodule is :class:`lightning_defense.datamodules.diffusion_purified.DiffusionPurifiedDataModule`.
"""

from lightning_defense.diffusion.denoise import (
    add_noise,
    denoise_one_step,
    noise_and_denoise,
    posterior,
    reverse_process,
    reverse_timesteps,
    sigma_at_timestep,
    timestep_for_sigma,
)
from lightning_defense.diffusion.denoiser import Denoiser, load_denoiser
from lightning_defense.diffusion.sparse import ImprovedDiffusionModel, SparseDenoiserBuilder, replicate
from lightning_defense.diffusion.training import DiffusionModel, vlb_bits_per_dim

__all__ = [
    "Denoiser",
    "DiffusionModel",
    "ImprovedDiffusionModel",
    "SparseDenoiserBuilder",
    "add_noise",
    "denoise_one_step",
    "load_denoiser",
    "noise_and_denoise",
    "posterior",
    "replicate",
    "reverse_process",
    "reverse_timesteps",
    "sigma_at_timestep",
    "timestep_for_sigma",
    "vlb_bits_per_dim",
]

"""A tiny randomly initialised diffusers DDPM for tests (8x8, two resolution levels)."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, DDPMPipeline, UNet2DModel


def tiny_unet(channels: int = 1, size: int = 8, learned_variance: bool = False, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=2 * channels if learned_variance else channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


def save_tiny_ddpm(directory, channels: int = 1, size: int = 8, timesteps: int = 100, seed: int = 0) -> str:
    """Write a tiny DDPM in diffusers pipeline format (safetensors) and return its directory."""
    pipeline = DDPMPipeline(tiny_unet(channels, size, seed=seed), DDPMScheduler(num_train_timesteps=timesteps))
    pipeline.save_pretrained(str(directory), safe_serialization=True)
    return str(directory)

"""Training a DDPM denoiser for a dataset that has no off-the-shelf one.

:class:`DiffusionModel` trains a diffusers ``UNet2DModel`` with the DDPM eps-prediction objective (Ho et
al., L_simple) and, as an option, the learned-range variance with Nichol & Dhariwal's hybrid loss
``L_simple + gamma * L_vlb`` and their cosine schedule (what ECLIPSE trains). It saves in diffusers
format, so the result loads with :func:`~lightning_defense.diffusion.load_denoiser` exactly like
``google/ddpm-cifar10-32``.

``lightning-defense train-denoiser --config configs/digits/train_denoiser.yaml`` trains on a datamodule's
training split and writes the model to ``--output_dir``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lightning_defense.core.batch import unpack_batch
from lightning_defense.diffusion.denoise import posterior, to_model_space


class DiffusionModel(L.LightningModule):
    """A DDPM (UNet eps-predictor + schedule) trained on a datamodule's training images.

    Args:
        sample_size: Image side length.
        in_channels: Image channels.
        block_out_channels: UNet channels per resolution (one down-sampling between levels).
        layers_per_block: ResNet blocks per level.
        attention: Use self-attention at the lowest resolution.
        dropout: Dropout in the ResNet blocks.
        num_train_timesteps: T.
        beta_schedule: ``linear`` (Ho et al.) or ``squaredcos_cap_v2`` (Nichol & Dhariwal's cosine schedule).
        learn_variance: Learned-range variance (the UNet outputs eps and v) trained with the hybrid loss.
        vlb_weight: gamma in ``L_simple + gamma * L_vlb``, with ``L_vlb = T * E_t[L_t]`` in bits per dimension
            (0.001 as in Nichol & Dhariwal).
        lr: AdamW learning rate.
        warmup_steps: Linear learning-rate warm-up.
        ema_decay: Decay of the exponential moving average of the weights that is saved (0 disables it).
        flip: Random horizontal flips of the training images.

    Example::

        model = DiffusionModel(sample_size=16, in_channels=1, block_out_channels=(32, 64))
        L.Trainer(max_steps=1000).fit(model, datamodule=DigitsDataModule(image_size=16))
        model.save_pretrained("lightning_defense/assets/digits_ddpm")
    """

    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        block_out_channels: Sequence[int] = (64, 128, 128),
        layers_per_block: int = 2,
        attention: bool = False,
        dropout: float = 0.0,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        learn_variance: bool = False,
        vlb_weight: float = 0.001,
        lr: float = 2e-4,
        warmup_steps: int = 0,
        ema_decay: float = 0.999,
        flip: bool = False,
    ) -> None:
        super().__init__()
        from diffusers import DDPMScheduler, UNet2DModel

        if sample_size < 4 or sample_size % 2 ** (len(block_out_channels) - 1):
            raise ValueError(
                f"sample_size must be >= 4 and divisible by 2^(levels-1) = {2 ** (len(block_out_channels) - 1)}; "
                f"got {sample_size}"
            )
        if beta_schedule not in ("linear", "squaredcos_cap_v2"):
            raise ValueError(f"beta_schedule must be 'linear' or 'squaredcos_cap_v2' (cosine); got {beta_schedule!r}")
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2; got {num_train_timesteps}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1); got {ema_decay}")
        if lr <= 0 or vlb_weight < 0:
            raise ValueError(f"lr must be > 0 and vlb_weight >= 0; got {lr}, {vlb_weight}")
        self.save_hyperparameters()
        levels = len(block_out_channels)
        down = ["DownBlock2D"] * levels
        up = ["UpBlock2D"] * levels
        if attention:
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        self.unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=2 * in_channels if learn_variance else in_channels,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            norm_num_groups=math.gcd(*block_out_channels, 32),
            dropout=dropout,
        )
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            variance_type="learned_range" if learn_variance else "fixed_small",
            clip_sample=True,
        )
        abar = self.scheduler.alphas_cumprod.double()
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        beta_tilde = (1 - abar / abar_prev) * (1 - abar_prev) / (1 - abar)
        self.register_buffer("abar", abar, persistent=False)
        self.register_buffer("abar_prev", abar_prev, persistent=False)
        # log beta_tilde, with t=0 (where it is 0) taking t=1's value, as Nichol & Dhariwal do
        self.register_buffer("log_beta_tilde", torch.cat([beta_tilde[1:2], beta_tilde[1:]]).log(), persistent=False)
        self.ema = AveragedModel(self.unet, multi_avg_fn=get_ema_multi_avg_fn(ema_decay)) if ema_decay > 0 else None

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.unet(x_t, t).sample

    def diffusion_loss(self, images: Tensor, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        """L_simple (and L_vlb, L_hybrid with learned variance) for a batch of [0, 1] images."""
        x0 = to_model_space(images)
        t = torch.randint(0, self.hparams.num_train_timesteps, (len(x0),), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        a = self.abar[t].view(-1, 1, 1, 1).to(x0.dtype)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        output = self(x_t, t)
        eps, v = output.split(x0.shape[1], dim=1) if self.hparams.learn_variance else (output, None)
        losses = {"simple": F.mse_loss(eps, noise)}
        if v is not None:
            losses["vlb"] = vlb_bits_per_dim(eps.detach(), v, x0, x_t, t, self.abar, self.abar_prev, self.log_beta_tilde).mean()
            scale = self.hparams.vlb_weight * self.hparams.num_train_timesteps
            losses["loss"] = losses["simple"] + scale * losses["vlb"]
        else:
            losses["loss"] = losses["simple"]
        return losses

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, _, _ = unpack_batch(batch)
        if tuple(images.shape[1:]) != (self.hparams.in_channels, self.hparams.sample_size, self.hparams.sample_size):
            raise ValueError(
                f"DiffusionModel(in_channels={self.hparams.in_channels}, sample_size={self.hparams.sample_size}) got "
                f"images shaped {tuple(images.shape[1:])}; set in_channels/sample_size to match the data"
            )
        if self.hparams.flip:
            flip = torch.rand(len(images), device=images.device) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        losses = self.diffusion_loss(images)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=len(images))
        return losses["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.unet)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.unet.parameters(), lr=self.hparams.lr, weight_decay=0.0)
        warmup = max(1, self.hparams.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the (EMA) UNet and its scheduler in diffusers pipeline format, weights as safetensors."""
        from diffusers import DDPMPipeline

        unet = self.ema.module if self.ema is not None else self.unet
        directory = Path(directory)
        DDPMPipeline(unet=unet, scheduler=self.scheduler).save_pretrained(str(directory), safe_serialization=True)
        return directory


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + (logvar1 - logvar2).exp() + (mean1 - mean2) ** 2 * (-logvar2).exp())


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log p(x) of [-1, 1] images quantised to 256 levels under N(mean, exp(log_scale)^2), elementwise."""
    inv_std = (-log_scale).exp()
    cdf_plus = torch.special.ndtr(inv_std * (x - mean + 1.0 / 255.0))
    cdf_minus = torch.special.ndtr(inv_std * (x - mean - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp_min(1e-12).log()
    log_one_minus_cdf_minus = (1.0 - cdf_minus).clamp_min(1e-12).log()
    log_delta = (cdf_plus - cdf_minus).clamp_min(1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_delta))


def vlb_bits_per_dim(
    eps: Tensor, v: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, abar: Tensor, abar_prev: Tensor, log_beta_tilde: Tensor
) -> Tensor:
    """The variational bound term L_t per sample, in bits per dimension (Nichol & Dhariwal, eq. 4-6).

    For t > 0, ``KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))``; for t = 0, the decoder's
    ``-log p(x0 | x1)``. Pass ``eps`` detached so that L_vlb trains only the variance (their stop-gradient).
    """
    view = (-1, 1, 1, 1)
    a_t, a_prev = abar[t].view(view), abar_prev[t].view(view)
    log_small = log_beta_tilde[t].view(view)
    x0_hat = (x_t - (1 - a_t).sqrt().to(x_t) * eps) / a_t.sqrt().to(x_t)
    true_mean, _ = posterior(x0, x_t, a_t, a_prev, "fixed_small")
    true_log_var = log_small.to(x_t).expand_as(x_t)
    model_mean, model_log_var = posterior(x0_hat, x_t, a_t, a_prev, "learned_range", v, log_small=log_small)
    kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
    return torch.where(t == 0, nll, kl)

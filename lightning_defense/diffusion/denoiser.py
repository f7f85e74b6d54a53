"""An off-the-shelf (or home-trained) DDPM: a diffusers ``UNet2DModel`` with its ``DDPMScheduler``.

:func:`load_denoiser` reads the diffusers format, from a local directory or a hub id, with safetensors
only (never pickle). Both layouts are accepted: a pipeline directory (``model_index.json``, ``unet/``,
``scheduler/``, as ``DDPMPipeline.save_pretrained`` writes it) and a flat one (``config.json``,
``diffusion_pytorch_model.safetensors`` and ``scheduler_config.json`` side by side, as in
``google/ddpm-cifar10-32``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from lightning_defense.diffusion.denoise import VARIANCE_TYPES


class Denoiser(nn.Module):
    """A UNet eps-predictor and its noise schedule: what diffusion denoising needs from a DDPM.

    Args:
        unet: A diffusers ``UNet2DModel`` predicting eps (C output channels) or eps and the
            learned-range variance (2C output channels).
        scheduler: Its ``DDPMScheduler`` (``alphas_cumprod``, ``variance_type``, ``prediction_type``).
        source: Where it was loaded from (for messages).
    """

    def __init__(self, unet: nn.Module, scheduler, source: str = "<in memory>") -> None:
        super().__init__()
        prediction = getattr(scheduler.config, "prediction_type", "epsilon")
        if prediction != "epsilon":
            raise ValueError(f"denoiser {source}: prediction_type must be 'epsilon'; got {prediction!r}")
        variance = getattr(scheduler.config, "variance_type", "fixed_small")
        if variance not in VARIANCE_TYPES:
            raise ValueError(f"denoiser {source}: variance_type must be one of {VARIANCE_TYPES}; got {variance!r}")
        in_ch, out_ch = unet.config.in_channels, unet.config.out_channels
        expected_out = 2 * in_ch if variance == "learned_range" else in_ch
        if out_ch != expected_out:
            raise ValueError(
                f"denoiser {source}: a {variance!r} UNet with {in_ch} input channels needs {expected_out} output "
                f"channels; got {out_ch}"
            )
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.source = source

    @property
    def alphas_cumprod(self) -> Tensor:
        return self.scheduler.alphas_cumprod

    @property
    def variance_type(self) -> str:
        return self.scheduler.config.variance_type

    @property
    def in_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def sample_size(self) -> Optional[int]:
        size = self.unet.config.sample_size
        return size if isinstance(size, int) or size is None else int(size[0])

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The UNet's raw output at timesteps ``t`` (eps, or eps and v)."""
        return self.unet(x_t, t).sample

    def fingerprint(self) -> str:
        """SHA-256 of the weights (names, shapes, dtypes, bytes) and the scheduler config: part of cache keys."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.unet.state_dict().items()):
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        for config in (self.unet.config, self.scheduler.config):  # "_name_or_path" etc. say nothing of the model
            public = {k: v for k, v in dict(config).items() if not k.startswith("_")}
            digest.update(json.dumps(public, sort_keys=True, default=str).encode())
        return digest.hexdigest()


def load_denoiser(source: Union[str, Path, Denoiser], local_files_only: bool = False) -> Denoiser:
    """Load a diffusers ``UNet2DModel`` + ``DDPMScheduler`` from a local directory or a hub id.

    Args:
        source: A local directory in diffusers format, a hub id (``google/ddpm-cifar10-32``), or an
            already built :class:`Denoiser` (returned as is).
        local_files_only: Never contact the hub.

    Raises:
        FileNotFoundError: ``source`` is neither a usable directory nor a reachable hub id; the message
            says what to download and where to put it.

    Example::

        denoiser = load_denoiser("lightning_defense/assets/digits_ddpm")
    """
    if isinstance(source, Denoiser):
        return source
    from diffusers import DDPMScheduler, UNet2DModel

    path = Path(source).expanduser()
    looks_local = path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") != 1
    if looks_local and not path.is_dir():
        raise FileNotFoundError(
            f"denoiser directory {str(source)!r} does not exist. Put a diffusers-format DDPM there: "
            "config.json + diffusion_pytorch_model.safetensors + scheduler_config.json (or unet/ and scheduler/ "
            "subfolders), e.g. `lightning-defense train-denoiser --config ...` writes one, or download "
            "https://huggingface.co/google/ddpm-cifar10-32 on a machine with network access"
        )
    if looks_local:
        unet_sub = "unet" if (path / "unet").is_dir() else None
    else:
        unet_sub = _hub_subfolder(str(source), local_files_only)
    sched_sub = "scheduler" if unet_sub == "unet" else None
    try:
        unet = UNet2DModel.from_pretrained(
            str(path) if looks_local else str(source), subfolder=unet_sub, use_safetensors=True,
            local_files_only=local_files_only,
        )
        scheduler = DDPMScheduler.from_pretrained(
            str(path) if looks_local else str(source), subfolder=sched_sub, local_files_only=local_files_only
        )
    except (OSError, EnvironmentError, ValueError) as error:
        where = f"directory {str(path)!r}" if looks_local else f"hub id {str(source)!r}"
        raise FileNotFoundError(
            f"could not load a diffusers DDPM from {where}: {error}\nIt needs config.json, "
            "diffusion_pytorch_model.safetensors (safetensors only; convert a .bin with "
            "`UNet2DModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)` on a trusted copy) "
            "and scheduler_config.json, flat or in unet/ and scheduler/ subfolders. Without hub access, download "
            f"https://huggingface.co/{source if not looks_local else 'google/ddpm-cifar10-32'} elsewhere and pass "
            "its local directory instead."
        ) from error
    return Denoiser(unet, scheduler, source=str(source))


def _hub_subfolder(repo_id: str, local_files_only: bool) -> Optional[str]:
    """``'unet'`` when a hub repo holds a pipeline layout, else None (flat)."""
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(repo_id, "unet/config.json", local_files_only=local_files_only)
        return "unet"
    except Exception:  # noqa: BLE001 - absent file or unreachable hub: try the flat layout
        return None

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
        """SHA-256 of the weights (names, shapes, dtypes, bytes) and the scheduler config: part of cache keys.

        Computed once and reused while no weight is replaced or changed in place (tensor version counters).
        """
        state = self.unet.state_dict()
        stamp = tuple((name, t.data_ptr(), t._version, t.device.type) for name, t in sorted(state.items()))
        cached = getattr(self, "_fingerprint", None)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        value = self._hash(state)
        self._fingerprint = (stamp, value)
        return value

    def _hash(self, state: dict) -> str:
        digest = hashlib.sha256()
        for name, tensor in sorted(state.items()):
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
    path = Path(source).expanduser()
    local = _is_local(str(source), path)
    if local and not path.is_dir():
        raise FileNotFoundError(
            f"denoiser directory {str(source)!r} does not exist (looked for {str(path.resolve())}). Put a "
            "diffusers-format DDPM there: config.json + diffusion_pytorch_model.safetensors + scheduler_config.json "
            "(or unet/ and scheduler/ subfolders), e.g. `lightning-defense train-denoiser --config ...` writes one, "
            "or copy https://huggingface.co/google/ddpm-cifar10-32 there from a machine with network access"
        )
    key = (str(path.resolve()), _directory_stamp(path)) if local else (str(source), local_files_only)
    if key not in _LOADED:
        _LOADED.clear()  # one denoiser per process at a time: a run reuses it, a new source replaces it
        _LOADED[key] = _load(str(source), path, local, local_files_only)
    return _LOADED[key]


#: The denoiser this process loaded last, by source (and, for a directory, its files' sizes and times).
_LOADED: dict[tuple, "Denoiser"] = {}


def _is_local(source: str, path: Path) -> bool:
    """A directory rather than a hub id ``owner/name``: it exists, starts with . / ~, has another number of
    parts than two, or its first part is an existing local directory (``weights/ddpm-cifar10-32``)."""
    return (path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1
            or Path(source.split("/")[0]).is_dir())


def _directory_stamp(path: Path) -> tuple:
    return tuple(sorted((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
                        for f in path.rglob("*") if f.is_file()))


def _hub_offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub's host, instead of the hub client's retries (about 46 s offline)."""
    import os
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load(source: str, path: Path, local: bool, local_files_only: bool) -> "Denoiser":
    """Read the UNet and scheduler; for a hub id the local cache first, the network only if it is reachable."""
    from diffusers import DDPMScheduler, UNet2DModel

    def read(offline: bool) -> "Denoiser":
        where = str(path) if local else source
        unet_sub = ("unet" if (path / "unet").is_dir() else None) if local else _hub_subfolder(source, offline)
        unet = UNet2DModel.from_pretrained(where, subfolder=unet_sub, use_safetensors=True, local_files_only=offline,
                                           low_cpu_mem_usage=False)  # no `accelerate` warning: a DDPM is small
        scheduler = DDPMScheduler.from_pretrained(
            where, subfolder="scheduler" if unet_sub == "unet" else None, local_files_only=offline)
        return Denoiser(unet, scheduler, source=source)

    try:
        if local:
            return read(offline=local_files_only)
        try:
            return read(offline=True)  # a cached copy needs no network at all
        except (OSError, EnvironmentError, ValueError):
            if local_files_only or _hub_offline():
                raise FileNotFoundError(
                    f"the Hugging Face cache has no copy of {source!r} and hub access is off "
                    f"({'local_files_only=True' if local_files_only else 'HF_HUB_OFFLINE=1'}). " + _FETCH_HINT.format(source)
                ) from None
            if not _hub_reachable():
                raise FileNotFoundError(
                    f"no network to reach the Hugging Face hub for {source!r}, and its cache has no copy. "
                    f"If {source!r} was meant as a local directory, it does not exist. " + _FETCH_HINT.format(source)
                ) from None
            return read(offline=False)
    except (OSError, EnvironmentError, ValueError) as error:
        if isinstance(error, FileNotFoundError) and str(error).startswith(("the Hugging Face cache", "no network")):
            raise
        where = f"directory {str(path)!r}" if local else f"hub id {source!r}"
        raise FileNotFoundError(
            f"could not load a diffusers DDPM from {where}: {error}\nIt needs config.json, "
            "diffusion_pytorch_model.safetensors (safetensors only; convert a .bin with "
            "`UNet2DModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)` on a trusted copy) "
            "and scheduler_config.json, flat or in unet/ and scheduler/ subfolders."
        ) from error


_FETCH_HINT = (
    "Set the denoiser (e.g. the config's data.init_args.denoiser) to a local directory: on a machine with network "
    "run `huggingface-cli download {0} --local-dir weights/{0}` (or `DDPMPipeline.from_pretrained('{0}')"
    ".save_pretrained(dir, safe_serialization=True)`), copy that directory here and pass its path; a populated "
    "Hugging Face cache also works, and HF_HUB_OFFLINE=1 then skips the network entirely"
)


def _hub_subfolder(repo_id: str, local_files_only: bool) -> Optional[str]:
    """``'unet'`` when a hub repo holds a pipeline layout, else None (flat)."""
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(repo_id, "unet/config.json", local_files_only=local_files_only)
        return "unet"
    except Exception:  # noqa: BLE001 - absent file or unreachable hub: try the flat layout
        return None

"""Out-of-domain initialisation (Hong, Carlini & Kurakin, 2024, Sec. 4.2): start from pretrained weights.

"Certified Robustness to Clean-Label Poisoning Using Diffusion Denoising" fine-tunes an
ImageNet-21k-pretrained ResNet on the denoised data, which recovers much of the accuracy that strong
denoising costs. This callback loads such weights into any LightningModule's backbone and gives it a
fresh classifier head for the task's classes.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from lightning_defense.core.collective import Collective
from lightning_defense.core.store import CorruptStoreError
from lightning_defense.models.backbones import head_module, load_backbone


class PretrainedInit(Callback):
    """Initialise ``pl_module.<backbone_attr>`` from a timm checkpoint or a local file, in ``setup``.

    Loading happens in ``setup(stage="fit")``, which runs before Lightning restores a checkpoint, so a
    resumed run keeps its own weights. The classifier head (timm's ``get_classifier()``, else ``fc``) is
    not loaded: it keeps the fresh initialisation sized for the task's classes (``reset_head=False``
    loads it when its shape fits).

    * ``model_name``: a timm name with a pretrained tag, e.g. ``"resnet18.a1_in1k"`` or the ImageNet-21k
      ``"resnetv2_50x1_bit.goog_in21k"`` (timm has no ImageNet-21k ResNet-18). The backbone must be the
      same timm architecture (``ImageClassifier(backbone="resnet18")``). Weights come from
      ``pretrained_file`` if given, else the Hugging Face cache, else a download when ``download=True``.
    * ``checkpoint_path``: a ``.safetensors`` file, or a ``.pt``/``.pth``/``.ckpt`` file read with
      ``torch.load(weights_only=True)``, holding the backbone's ``state_dict`` (a Lightning checkpoint's
      ``state_dict`` with ``backbone.`` prefixes also works).

    Args:
        model_name: timm model name with pretrained tag.
        checkpoint_path: Local checkpoint file.
        pretrained_file: Local copy of ``model_name``'s weight file (no network needed).
        download: Allow timm to download ``model_name``'s weights when they are not cached.
        backbone_attr: Attribute of the LightningModule that holds the backbone (``""``: the module itself).
        reset_head: Keep the fresh classifier head instead of loading the checkpoint's.
        strict: Fail on parameters missing from, or unexpected in, the checkpoint (the head aside).

    Raises:
        ValueError: If not exactly one of ``model_name`` / ``checkpoint_path`` is given.
        FileNotFoundError: If a given file does not exist.

    Example::

        model = ImageClassifier("resnet18", num_classes=10)
        trainer = L.Trainer(callbacks=[PretrainedInit(model_name="resnet18.a1_in1k")])
    """

    def __init__(
        self,
        model_name: Optional[str] = None,
        checkpoint_path: Optional[Union[str, Path]] = None,
        pretrained_file: Optional[Union[str, Path]] = None,
        download: bool = True,
        backbone_attr: str = "backbone",
        reset_head: bool = True,
        strict: bool = True,
    ) -> None:
        if (model_name is None) == (checkpoint_path is None):
            raise ValueError(
                "give exactly one of model_name= (a timm name such as 'resnet18.a1_in1k') or checkpoint_path= "
                f"(a .safetensors/.pt file); got model_name={model_name!r}, checkpoint_path={checkpoint_path!r}"
            )
        if checkpoint_path is not None:
            _check_file("checkpoint_path", checkpoint_path, (".safetensors", ".pt", ".pth", ".ckpt", ".bin"))
        if pretrained_file is not None:
            if model_name is None:
                raise ValueError("pretrained_file is the local weight file of model_name=; use checkpoint_path= alone")
            _check_file("pretrained_file", pretrained_file, (".safetensors", ".pt", ".pth", ".bin", ".npz"))
        if model_name is not None:
            import timm

            if not timm.is_model(model_name.split(".")[0]):
                raise ValueError(f"model_name {model_name!r} is not a timm model; see timm.list_pretrained()")
        self.model_name = model_name
        self.checkpoint_path = checkpoint_path
        self.pretrained_file = pretrained_file
        self.download = download
        self.backbone_attr = backbone_attr
        self.reset_head = reset_head
        self.strict = strict
        self._initialised: Optional[weakref.ref] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(model_name=self.model_name, checkpoint_path=str(self.checkpoint_path))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        backbone = self._backbone(pl_module)
        if self._initialised is not None and self._initialised() is backbone:
            return  # a second fit() on the same model continues from its weights
        if self.model_name is not None:
            source = f"timm {self.model_name!r}"
            # local rank 0 first, so that a download happens once per machine
            if trainer.local_rank == 0:
                state = self._timm_state_dict(backbone)
            Collective.of(trainer).barrier("PretrainedInit.download")
            if trainer.local_rank != 0:
                state = self._timm_state_dict(backbone)
        else:
            state, source = load_state_dict_file(self.checkpoint_path), repr(str(self.checkpoint_path))
        load_backbone(backbone, state, reset_head=self.reset_head, strict=self.strict, source=source)
        self._initialised = weakref.ref(backbone)
        rank_zero_info(f"PretrainedInit: initialised {type(backbone).__name__} from {source}")

    def _backbone(self, pl_module: L.LightningModule) -> nn.Module:
        if not self.backbone_attr:
            return pl_module
        backbone = getattr(pl_module, self.backbone_attr, None)
        if not isinstance(backbone, nn.Module):
            raise AttributeError(
                f"{type(pl_module).__name__} has no module attribute {self.backbone_attr!r}; set backbone_attr "
                "to the attribute holding the network ('' for the LightningModule itself)"
            )
        return backbone

    def _timm_state_dict(self, backbone: nn.Module) -> dict[str, torch.Tensor]:
        import timm
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(self.model_name)
        if cfg is None:
            raise ValueError(f"timm has no pretrained weights named {self.model_name!r}; see timm.list_pretrained()")
        arch = cfg.architecture
        target_arch = getattr(getattr(backbone, "pretrained_cfg", None) or {}, "get", lambda _k: None)("architecture")
        if target_arch != arch:
            raise ValueError(
                f"model_name {self.model_name!r} is a {arch!r} but the backbone is {type(backbone).__name__} "
                f"(timm architecture {target_arch!r}); build the model with backbone={arch!r}"
            )
        overlay = {}
        hub_id = cfg.hf_hub_id
        filename = cfg.hf_hub_filename or "model.safetensors"
        if self.pretrained_file is not None:
            if Path(self.pretrained_file).suffix == ".npz":  # the original JAX weights: timm's own loader
                overlay = {"file": str(self.pretrained_file)}
            else:
                overlay = {"state_dict": load_state_dict_file(self.pretrained_file)}
        elif hub_id:
            cached = _hf_cached(hub_id)
            if cached is not None:
                overlay = {"state_dict": load_state_dict_file(cached)}
            elif not self.download:
                raise FileNotFoundError(_offline_message(self.model_name, hub_id, filename, "download=False and"))
        num_classes = getattr(backbone, "num_classes", 1000)
        in_chans = _in_chans(backbone, cfg.first_conv)
        try:
            source = timm.create_model(
                self.model_name, pretrained=True, num_classes=num_classes, in_chans=in_chans,
                pretrained_cfg_overlay=overlay or None,
            )
        except Exception as err:  # noqa: BLE001 - network and hub errors come in many types
            if overlay:
                raise
            raise RuntimeError(_offline_message(self.model_name, hub_id, filename, f"downloading failed ({err}):")) from err
        return source.state_dict()


def load_state_dict_file(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``, never unpickled)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise CorruptStoreError(
                f"the weight file {str(path)!r} cannot be read as safetensors ({err}): it is truncated or damaged. "
                "Copy or download it again (compare its size and SHA-256 with the original's)"
            ) from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"checkpoint_path {str(path)!r} could not be read with torch.load(weights_only=True): {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint_path {str(path)!r} holds no state dict of tensors")
    return state


def _check_file(name: str, path: Any, suffixes: tuple[str, ...]) -> None:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{name} {str(path)!r} does not exist")
    if p.suffix not in suffixes:
        raise ValueError(f"{name} {str(path)!r} must end in one of {suffixes}")


def _in_chans(backbone: nn.Module, first_conv: Optional[str]) -> int:
    if isinstance(first_conv, (list, tuple)):
        first_conv = first_conv[0]
    weight = backbone.state_dict().get(f"{first_conv}.weight") if first_conv else None
    return int(weight.shape[1]) if weight is not None else 3


def _hf_cached(hub_id: str) -> Optional[str]:
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(hub_id, filename)
        if isinstance(path, str):
            return path
    return None


def _offline_message(model_name: str, hub_id: str, filename: str, why: str) -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return (
        f"PretrainedInit: {why} the weights of {model_name!r} are not in the Hugging Face cache ({HF_HUB_CACHE}). "
        f"Download https://huggingface.co/{hub_id}/resolve/main/{filename} on a machine with network access, then "
        f"either run `huggingface-cli download {hub_id} {filename}` there and copy the cache directory to "
        f"{HF_HUB_CACHE}, or pass pretrained_file=/path/to/{filename}"
    )

"""Backbones: the papers' CIFAR-style ResNet-18, a small CPU-friendly CNN, and any timm model."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor

from lightning_defense.models.airbench import AirbenchNet


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":  # DP-SGD cannot use BatchNorm: per-sample gradients need per-sample layers
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    raise ValueError(f"norm must be 'batch' or 'group'; got {kind!r}")


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head: trains on the digits in seconds on a CPU.

    Args:
        num_classes: Output classes.
        in_chans: Input channels.
        width: Channels of the first block (doubled in each of the next two).
        norm: ``"batch"`` or ``"group"`` normalisation.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 32, norm: str = "batch") -> None:
        super().__init__()
        w = width
        block = lambda cin, cout: [nn.Conv2d(cin, cout, 3, padding=1, bias=False), _norm(norm, cout), nn.ReLU(inplace=True)]  # noqa: E731
        self.features = nn.Sequential(
            *block(in_chans, w), *block(w, 2 * w), nn.MaxPool2d(2), *block(2 * w, 4 * w), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.num_features = 4 * w
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(norm, cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet18(nn.Module):
    """ResNet-18 as the poisoning papers use it on CIFAR-10: 3x3 stem, stride 1, no max-pool."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, norm: str = "batch") -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False), _norm(norm, 64), nn.ReLU(inplace=True))
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [BasicBlock(cin, cout, stride, norm), BasicBlock(cout, cout, 1, norm)]
            cin = cout
        self.layers = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = 512
        self.fc = nn.Linear(512, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.layers(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))


BACKBONES: dict[str, Callable[..., nn.Module]] = {"small_cnn": SmallCNN, "resnet18_cifar": CifarResNet18, "airbench": AirbenchNet}


def build_backbone(name: str, num_classes: int, in_chans: int, **kwargs) -> nn.Module:
    """Build ``name``: one of :data:`BACKBONES`, else a timm model (randomly initialised).

    Pretrained weights are the ``PretrainedInit`` callback's job, so nothing is downloaded here.
    """
    if name in BACKBONES:
        return BACKBONES[name](num_classes=num_classes, in_chans=in_chans, **kwargs)
    import timm

    if not timm.list_models(name) and name.split(".")[0] not in timm.list_models():
        raise ValueError(f"unknown backbone {name!r}: use one of {sorted(BACKBONES)} or a timm model name")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


def head_module(backbone: nn.Module) -> Optional[nn.Module]:
    """The classifier head: timm's ``get_classifier()``, else ``fc``; None if there is none."""
    if hasattr(backbone, "get_classifier"):
        head = backbone.get_classifier()
        return head if isinstance(head, nn.Module) and any(True for _ in head.parameters()) else None
    return getattr(backbone, "fc", None)


def load_backbone(
    backbone: nn.Module, state: dict[str, torch.Tensor], reset_head: bool = True, strict: bool = True, source: str = "the checkpoint"
) -> None:
    """Copy ``state`` into ``backbone``, skipping the head (or a head whose shape does not fit)."""
    own = backbone.state_dict()
    if not any(k in own for k in state):
        for prefix in ("backbone.", "model.", "module."):
            if any(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                break
    head = head_module(backbone)
    head_keys = set()
    if head is not None:
        name = next(n for n, m in backbone.named_modules() if m is head)
        head_keys = {f"{name}.{k}" for k in head.state_dict()}
    if reset_head:
        state = {k: v for k, v in state.items() if k not in head_keys}
    else:
        state = {k: v for k, v in state.items() if not (k in head_keys and v.shape != own[k].shape)}
    mismatched = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(state) - head_keys)
    unexpected = sorted(set(state) - set(own))
    if mismatched or (strict and (missing or unexpected)):
        raise ValueError(
            f"{source} does not fit {type(backbone).__name__}: shape mismatches {mismatched[:5]}, "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''} (strict=False ignores missing/unexpected keys)"
        )
    with torch.no_grad():
        for key, value in state.items():
            if key in own:
                own[key].copy_(value.to(own[key].dtype))

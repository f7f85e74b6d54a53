"""Several copies of one architecture trained as one network: their layers stacked along the channels.

The certification loop trains many small models of one architecture (Hong et al.; RAB; DPA). Model ``g``'s
channels become the ``g``-th block of every layer: a convolution with ``groups`` becomes one with
``G * groups``, BatchNorm/GroupNorm get ``G`` times the channels (each channel's statistics are still its own
model's), and a linear layer becomes a batched matrix product. Elementwise layers, pools and the residual
additions act per channel, so they need no change. Inputs go in as ``(B, G * C, H, W)`` and logits come out
as ``(B, G * K)``; each model's computation is its own (no value crosses between blocks), so the gradient
of the sum of the models' losses is each model's own gradient. All tensors stay contiguous, which on a CPU
is what ``torch.func.vmap`` over stacked weights loses (it permutes every activation).

Only backbones whose ``forward`` is known to act per channel are stacked (:data:`GROUPABLE`); a new layer
type or backbone raises, and the caller then trains the group with ``vmap``.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from lightning_defense.models.airbench import AirbenchNet, ConvGroup
from lightning_defense.models.backbones import BasicBlock, CifarResNet18, SmallCNN

__all__ = ["GROUPABLE", "GroupedLinear", "can_stack", "stack_layers"]

#: Backbones whose forward passes only act per channel between their convolutions, norms and linear layers.
GROUPABLE = (SmallCNN, CifarResNet18, AirbenchNet)
_PER_CHANNEL = (nn.ReLU, nn.GELU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity,
                nn.Sequential)


class GroupedLinear(nn.Module):
    """``G`` linear layers on ``(B, G * in)`` inputs: model ``g`` maps its block of ``in`` features to its ``out``."""

    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.groups, self.in_features, self.out_features = len(layers), layers[0].in_features, layers[0].out_features
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]).clone())  # (G, out, in)
        self.bias = (nn.Parameter(torch.stack([layer.bias.detach() for layer in layers]).clone())
                     if layers[0].bias is not None else None)
        for name in ("weight", "bias"):
            if getattr(self, name) is not None:
                getattr(self, name).requires_grad_(getattr(layers[0], name).requires_grad)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        out = torch.bmm(x.view(b, self.groups, self.in_features).transpose(0, 1), self.weight.transpose(1, 2))
        if self.bias is not None:
            out = out + self.bias[:, None, :]
        return out.transpose(0, 1).reshape(b, self.groups * self.out_features)


def _cat(layers: Sequence[nn.Module], name: str) -> Tensor:
    return torch.cat([getattr(layer, name).detach() for layer in layers]).clone()


def _stacked(layers: Sequence[nn.Module]) -> nn.Module:
    first, g = layers[0], len(layers)
    like = next(itertools.chain(first.parameters(), first.buffers()), None)
    like = {} if like is None else {"device": like.device, "dtype": like.dtype}  # the copies keep the layers' dtype
    if isinstance(first, nn.Conv2d):
        new = nn.Conv2d(first.in_channels * g, first.out_channels * g, first.kernel_size, first.stride, first.padding,
                        first.dilation, first.groups * g, first.bias is not None, first.padding_mode, **like)
    elif isinstance(first, nn.BatchNorm2d):
        new = nn.BatchNorm2d(first.num_features * g, first.eps, first.momentum, first.affine, first.track_running_stats,
                             **like)
        if first.track_running_stats:
            for name in ("running_mean", "running_var"):
                getattr(new, name).copy_(_cat(layers, name))
            new.num_batches_tracked.copy_(first.num_batches_tracked)
    elif isinstance(first, nn.GroupNorm):
        new = nn.GroupNorm(first.num_groups * g, first.num_channels * g, first.eps, first.affine, **like)
    elif isinstance(first, nn.Linear):
        return GroupedLinear(layers)
    else:
        raise TypeError(f"cannot stack {type(first).__name__} layers")
    with torch.no_grad():
        for name in ("weight", "bias"):
            if getattr(first, name, None) is not None:
                getattr(new, name).copy_(_cat(layers, name))
                getattr(new, name).requires_grad_(getattr(first, name).requires_grad)  # a fixed one stays fixed
    return new


def can_stack(backbone: nn.Module) -> bool:
    """Whether :func:`stack_layers` can stack copies of ``backbone``."""
    if not isinstance(backbone, GROUPABLE):
        return False
    stackable = (nn.Conv2d, nn.BatchNorm2d, nn.GroupNorm, nn.Linear, BasicBlock, ConvGroup, *_PER_CHANNEL, *GROUPABLE)
    return all(isinstance(m, stackable) for m in backbone.modules())


def stack_layers(backbones: Sequence[nn.Module]) -> nn.Module:
    """One network computing all of ``backbones`` (one architecture) at once, on ``(B, G * C, H, W)`` inputs.

    Its parameters are copies: train it, not the originals. Raises TypeError for a backbone that
    :func:`can_stack` refuses.
    """
    first = backbones[0]
    if not can_stack(first) or any(type(b) is not type(first) for b in backbones):
        raise TypeError(f"cannot stack {sorted({type(b).__name__ for b in backbones})}: only one of "
                        f"{[c.__name__ for c in GROUPABLE]} at a time; train the group with torch.func.vmap instead")
    stacked = copy.deepcopy(first)
    members = [dict(b.named_modules()) for b in backbones]
    for name, module in list(stacked.named_modules()):
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.GroupNorm, nn.Linear)):
            parent, _, leaf = name.rpartition(".")
            setattr(stacked.get_submodule(parent), leaf, _stacked([m[name] for m in members]))
    return stacked

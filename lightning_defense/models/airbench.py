"""airbench94's network (Jordan, 2024) with configurable widths: a patch-whitening stem, conv groups, a scaled head.

Registered as the backbone ``"airbench"``; :class:`~lightning_defense.models.FastImageClassifier` trains it with
its recipe and sets the whitening from the first training batch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AirbenchNet", "ConvGroup", "image_patches", "whitening_filters"]


def image_patches(images: Tensor, kernel: int) -> Tensor:
    """Every ``kernel x kernel`` patch of ``images`` (N, C, H, W), flattened: (N * (H-k+1) * (W-k+1), C*k*k)."""
    patches = images.unfold(2, kernel, 1).unfold(3, kernel, 1)  # N, C, H', W', k, k
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1] * kernel * kernel)


def whitening_filters(images: Tensor, kernel: int, eps: float) -> Tensor:
    """The whitening filters of ``images``' patches: (2 * C*k*k, C, k, k).

    With ``Sigma = E[p p^T]`` the patches' second moment and ``Sigma = V diag(lambda) V^T``, filter ``j`` is
    ``v_j / sqrt(lambda_j + eps)`` (largest eigenvalue first) and filter ``d + j`` its negative, so the first
    ``d = C*k*k`` outputs have second moment ``diag(lambda / (lambda + eps))``, about the identity. Computed in
    float64.
    """
    channels = images.shape[1]
    patches = image_patches(images.detach().double(), kernel)
    moment = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(moment)
    eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
    filters = (eigenvectors / torch.sqrt(eigenvalues + eps)).T.reshape(-1, channels, kernel, kernel)
    return torch.cat([filters, -filters]).float()


class _BatchNorm(nn.BatchNorm2d):
    """BatchNorm with a fixed unit scale (only the bias trains) and airbench's fast running statistics."""

    def __init__(self, channels: int, momentum: float) -> None:
        super().__init__(channels, eps=1e-12, momentum=momentum)
        self.weight.requires_grad_(False)


class ConvGroup(nn.Module):
    """Conv, max-pool, BatchNorm, GELU, conv, BatchNorm, GELU: every step after a convolution acts per channel."""

    def __init__(self, cin: int, cout: int, bn_momentum: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm1 = _BatchNorm(cout, bn_momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = _BatchNorm(cout, bn_momentum)
        for conv in (self.conv1, self.conv2):  # identity-initialised: the first cin filters pass their channel
            with torch.no_grad():
                nn.init.dirac_(conv.weight[: conv.weight.shape[1]])

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        if min(x.shape[-2:]) >= 2:  # small images run out of resolution before the last group
            x = F.max_pool2d(x, 2)
        x = F.gelu(self.norm1(x), approximate="tanh")
        return F.gelu(self.norm2(self.conv2(x)), approximate="tanh")


class AirbenchNet(nn.Module):
    """airbench94's network, with configurable widths: a 2x2 patch-whitening stem, conv groups, a scaled head.

    The stem's filters are fixed (not trained); they are random until :meth:`init_whitening` sets them from
    training images (``FastImageClassifier`` does that on its first training batch). Its bias trains. GELU is
    its tanh approximation: the exact GELU's tails produce denormal floats, which made CPU steps about 8x slower.
    Each conv group halves the resolution (while it is at least 2); a global max-pool and a linear head scaled by
    ``scale`` follow.

    Args:
        num_classes: Output classes.
        in_chans: Input channels.
        widths: Channels of each conv group (airbench94: 64, 256, 256).
        whiten_kernel: Side of the whitening patches (stem width ``2 * in_chans * whiten_kernel**2``).
        whiten_eps: Added to the eigenvalues before scaling (airbench94: 5e-4).
        bn_momentum: PyTorch BatchNorm momentum (airbench94's 0.6 in its convention is 0.4 here).
        scale: Factor on the head's logits (airbench94: 1/9).

    Example::

        net = AirbenchNet(num_classes=10, in_chans=3, widths=(32, 64, 64))
        net.init_whitening(train_images_normalised[:512])
        logits = net(x)
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, widths: Sequence[int] = (64, 256, 256),
                 whiten_kernel: int = 2, whiten_eps: float = 5e-4, bn_momentum: float = 0.4,
                 scale: float = 1 / 9) -> None:
        super().__init__()
        widths = tuple(widths)
        if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty list of positive ints (e.g. [64, 256, 256]); got {widths!r}")
        if not isinstance(whiten_kernel, int) or whiten_kernel < 1:
            raise ValueError(f"whiten_kernel must be an int >= 1 (airbench94: 2); got {whiten_kernel!r}")
        if not whiten_eps > 0:
            raise ValueError(f"whiten_eps must be > 0 (airbench94: 5e-4); got {whiten_eps}")
        if not 0 <= bn_momentum <= 1:
            raise ValueError(f"bn_momentum must be in [0, 1] (PyTorch's convention; airbench94: 0.4); got {bn_momentum}")
        self.whiten_kernel, self.whiten_eps = whiten_kernel, float(whiten_eps)
        stem_width = 2 * in_chans * whiten_kernel**2
        self.stem = nn.Conv2d(in_chans, stem_width, whiten_kernel, padding=0, bias=True)
        self.stem.weight.requires_grad_(False)
        with torch.no_grad():
            self.stem.bias.zero_()
        self.register_buffer("whitened", torch.tensor(False))
        cins = (stem_width,) + widths[:-1]
        self.groups = nn.Sequential(*(ConvGroup(cin, cout, bn_momentum) for cin, cout in zip(cins, widths)))
        self.num_features = widths[-1]
        self.fc = nn.Linear(widths[-1], num_classes, bias=False)
        self.scale = float(scale)

    @torch.no_grad()
    def init_whitening(self, images: Tensor) -> None:
        """Set the stem's filters from the patches of ``images`` (normalised as the network sees them)."""
        self.stem.weight.copy_(whitening_filters(images, self.whiten_kernel, self.whiten_eps).to(self.stem.weight))
        self.whitened.fill_(True)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.groups(F.gelu(self.stem(x), approximate="tanh"))
        return torch.amax(x, dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x)) * self.scale

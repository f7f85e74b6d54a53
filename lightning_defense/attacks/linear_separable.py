"""LSP: linearly separable synthetic perturbations (Yu et al., "Availability Attacks Create Shortcuts", KDD 2022).

Each class gets a patch-wise constant colour pattern: the image is cut into ``patch_size`` squares and
each square of class c's pattern takes one random value per channel (for l_inf, +-eps: a vertex of
the ball, so the whole bound is used). The patterns are linearly
separable by construction, so a network fits them before it learns the real features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_defense.attacks._common import IndiscriminateAttack, scale_to_ball


class LinearSeparablePerturbation(IndiscriminateAttack):
    """Class-wise patch patterns, scaled onto the eps-sphere.

    Args:
        eps: Bound in [0, 1] pixel units (l_inf 8/255, or an l2 bound).
        norm: ``"linf"`` or ``"l2"``.
        budget: Fraction of the training set perturbed (1.0 in the paper and ECLIPSE).
        patch_size: Side of the constant-colour squares (8 on 32x32 CIFAR-10 and on 16x16 digits).
        progress: Unused; kept for the common interface.

    Raises:
        ValueError: If ``patch_size`` < 1.

    Example::

        poisons = LinearSeparablePerturbation(eps=8 / 255, patch_size=8).craft(images, labels, seed=0)
    """

    name = "lsp"

    def __init__(self, eps: float, norm: str = "linf", budget: float = 1.0, patch_size: int = 8,
                 progress: bool = True) -> None:
        super().__init__(eps, norm, budget, progress)
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be an int >= 1 (pixels); got {patch_size!r}")
        self.patch_size = patch_size

    def perturbation(self, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
        num_classes = int(labels.max()) + 1
        channels, height, width = images.shape[1:]
        grid = (-(-height // self.patch_size), -(-width // self.patch_size))
        colours = torch.rand((num_classes, channels, *grid), generator=generator) * 2 - 1
        if self.norm == "linf":  # every square at a vertex of the ball (+-eps): the pattern uses the whole bound
            colours = colours.sign()
        patterns = F.interpolate(colours, scale_factor=self.patch_size, mode="nearest")[..., :height, :width]
        return scale_to_ball(patterns, self.eps, self.norm)[labels]

"""URP: class-wise universal random perturbations (Huang et al. 2021; Tao et al. 2021).

Every image of class c gets the same random pattern delta_c. No model is involved: the network learns the
class-wise pattern, an easy shortcut, instead of the digits or objects, and its clean test accuracy drops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_defense.attacks.base import IndiscriminateAttack, scale_to_ball


class UniversalRandomPerturbation(IndiscriminateAttack):
    """Class-wise random noise: ``x + delta_{y}`` with one pattern per class.

    For ``linf`` each pattern is uniform in [-eps, eps] per pixel; for ``l2`` it is Gaussian, scaled to
    l2 norm ``eps``. Pixels are then clipped to [0, 1].

    Args:
        eps: Bound in [0, 1] pixel units (ECLIPSE's setting: 8/255 in l_inf).
        norm: ``"linf"`` or ``"l2"``.
        budget: Fraction of the training set perturbed (1.0: all of it, as in ECLIPSE).
        progress: Unused (crafting is instantaneous); kept for the common interface.
        device: Where the perturbations are computed (``"auto"``, ``"cpu"``, ``"cuda[:i]"``, ``"mps"``); the random
            draws stay on the CPU, so the poisons are the same bytes on every device up to float rounding.

    Example::

        poisons = UniversalRandomPerturbation(eps=8 / 255).craft(images, labels, seed=0)
    """

    name = "urp"

    def perturbation(self, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
        num_classes = int(labels.max()) + 1
        shape = (num_classes, *images.shape[1:])
        if self.norm == "linf":
            patterns = (torch.rand(shape, generator=generator) * 2 - 1) * self.eps
        else:
            patterns = scale_to_ball(torch.randn(shape, generator=generator), self.eps, "l2")
        return patterns.to(labels.device)[labels]  # drawn on the CPU (the keyed stream), used on the attack's device

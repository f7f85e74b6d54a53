"""AR: autoregressive perturbations (Sandoval-Segura et al., "Autoregressive Perturbations for Data Poisoning", NeurIPS 2022).

Each class c owns an AR filter: ``window - 1`` coefficients beta_c over a pixel's causal neighbourhood
(the ``window x window`` square above and to the left of it). Each image of class c gets its own
sample of the AR process ``x[i, j] = sum_k beta_c[k] * x[neighbour_k(i, j)]``, started from Gaussian
noise on the top rows and left columns, then scaled onto the eps-sphere. The filter
``[beta_c, -1]`` maps class c's noise to zero, so a convolution separates the classes: a shortcut.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_defense.attacks.base import IndiscriminateAttack, scale_to_ball


class AutoregressivePerturbation(IndiscriminateAttack):
    """Class-wise AR filters, one fresh AR sample per image.

    Args:
        eps: Bound in [0, 1] pixel units; the paper uses l2 eps = 1 on 32x32x3 CIFAR-10.
        norm: ``"l2"`` (the paper's) or ``"linf"``.
        budget: Fraction of the training set perturbed (1.0 in the paper).
        window: Side of the AR window (3 in the paper: 8 coefficients per channel).
        progress: Show a progress bar over the rows being generated.
        device: Where the perturbations are computed (``"auto"``, ``"cpu"``, ``"cuda[:i]"``, ``"mps"``); the random
            draws stay on the CPU, so the poisons are the same bytes on every device up to float rounding.

    Raises:
        ValueError: If ``window`` < 2.

    Example::

        poisons = AutoregressivePerturbation(eps=1.0, norm="l2").craft(images, labels, seed=0)
    """

    name = "ar"

    def __init__(self, eps: float, norm: str = "l2", budget: float = 1.0, window: int = 3, progress: bool = True,
                 device: str = "auto") -> None:
        super().__init__(eps, norm, budget, progress, device)
        if not isinstance(window, int) or window < 2:
            raise ValueError(f"window must be an int >= 2; got {window!r}")
        self.window = window

    def filters(self, num_classes: int, channels: int, generator: torch.Generator) -> Tensor:
        """(num_classes, channels, window*window - 1) coefficients beta, each set summing to 1."""
        beta = torch.randn((num_classes, channels, self.window * self.window - 1), generator=generator)
        return beta / beta.sum(dim=-1, keepdim=True)

    def perturbation(self, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
        n, channels, height, width = images.shape
        k = self.window
        # Drawn on the CPU (the keyed stream), then generated on the attack's device.
        beta = self.filters(int(labels.max()) + 1, channels, generator)[labels.cpu()].to(images.device)  # (n, C, k*k-1)
        # Generate on a canvas with k-1 extra rows/columns of noise that start the process.
        canvas = torch.randn((n, channels, height + k - 1, width + k - 1), generator=generator).to(images.device)
        with self._bar(height, "AR rows") as bar:
            for i in range(k - 1, height + k - 1):
                for j in range(k - 1, width + k - 1):
                    window = canvas[:, :, i - k + 1:i + 1, j - k + 1:j + 1].reshape(n, channels, -1)[..., :-1]
                    canvas[:, :, i, j] = (window * beta).sum(-1)
                # The process is linear and homogeneous: rescaling the canvas keeps its shape, avoids overflow.
                canvas = canvas / canvas.flatten(1).abs().amax(1).clamp_min(1e-12).view(n, 1, 1, 1)
                bar.update()
        return scale_to_ball(canvas[:, :, k - 1:, k - 1:], self.eps, self.norm)

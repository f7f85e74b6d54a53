"""LSP: linearly separable synthetic perturbations (Yu et al., "Availability Attacks Create Shortcuts", KDD 2022).

:class:`LinearSeparablePerturbation` is the paper's attack: every sample gets its own perturbation, a
point drawn from its class's Gaussian cluster in a low-dimensional space with one coordinate per
``patch_size`` square and channel. The clusters sit far apart (at vertices of a hypercube, ``class_sep``
from the origin along every axis), so the points are linearly separable by class. Each point is
upsampled to a patch-wise constant image and scaled in L2; the paper's "eps = 8/255" is an L2 norm of
``eps_inf * sqrt(d)`` for ``d`` pixels per image. A network fits this shortcut before the real features.

:class:`ClasswiseLinearSeparablePerturbation` is the simpler variant with one constant pattern per class.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_defense.attacks.base import IndiscriminateAttack, scale_to_ball


def _check_patch_size(patch_size: int) -> None:
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
        raise ValueError(f"patch_size must be an int >= 1 (pixels); got {patch_size!r}")


def _grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Number of ``patch_size`` squares along each side (the last ones cropped to the image)."""
    return -(-height // patch_size), -(-width // patch_size)


def _upsample(cells: Tensor, patch_size: int, height: int, width: int) -> Tensor:
    """``(n, C, gh, gw)`` cell values -> ``(n, C, height, width)`` patch-wise constant images."""
    return F.interpolate(cells, scale_factor=patch_size, mode="nearest")[..., :height, :width]


class LinearSeparablePerturbation(IndiscriminateAttack):
    """Yu et al.'s LSP: one point per sample from class-wise Gaussian clusters, upsampled to patches.

    For ``k = C * ceil(H / patch_size) * ceil(W / patch_size)`` coordinates, class ``c`` gets a centroid
    ``class_sep * s_c`` at a distinct random vertex ``s_c`` of ``{-1, 1}^k`` and a random linear map
    ``A_c`` (entries uniform in [-1, 1]); sample ``i`` of class ``c`` gets ``z_i A_c + class_sep * s_c``
    with ``z_i ~ N(0, I_k)`` (the paper's code draws them with scikit-learn's ``make_classification``,
    ``class_sep=10``). Each point fills its ``patch_size`` squares and is scaled so that its ``norm`` is
    ``eps``; the poisoned pixels are then clipped to [0, 1].

    Args:
        eps: The L2 norm of every perturbation in [0, 1] pixel units. The paper states a per-pixel
            ``eps_inf`` and uses L2 norm ``eps_inf * sqrt(d)``: 8/255 on 32x32x3 CIFAR-10 is
            ``8 / 255 * sqrt(3072) = 1.739``. With ``norm="linf"`` (not the paper's), each sample is
            scaled so that its largest pixel change is ``eps``.
        norm: ``"l2"`` (the paper's) or ``"linf"``.
        budget: Fraction of the training set perturbed (1.0 in the paper and ECLIPSE).
        patch_size: Side of the constant squares (8 on 32x32 CIFAR-10, the paper's default).
        class_sep: Distance of the cluster centres from the origin along every axis, in units of the
            clusters' spread (10 in the paper's code).
        progress: Unused; kept for the common interface.
        device: Where the perturbations are computed (``"auto"``, ``"cpu"``, ``"cuda[:i]"``, ``"mps"``); the random
            draws stay on the CPU, so the poisons are the same bytes on every device up to float rounding.

    Raises:
        ValueError: If ``patch_size`` < 1 or ``class_sep`` <= 0; when crafting, if the ``k`` coordinates
            give fewer than one hypercube vertex per class (lower ``patch_size``).

    Example::

        # CIFAR-10 at the paper's 8/255: L2 norm 8/255 * sqrt(3 * 32 * 32)
        poisons = LinearSeparablePerturbation(eps=8 / 255 * 3072 ** 0.5, patch_size=8).craft(images, labels, seed=0)
    """

    name = "lsp"

    def __init__(self, eps: float, norm: str = "l2", budget: float = 1.0, patch_size: int = 8,
                 class_sep: float = 10.0, progress: bool = True, device: str = "auto") -> None:
        super().__init__(eps, norm, budget, progress, device)
        _check_patch_size(patch_size)
        if not (isinstance(class_sep, (int, float)) and math.isfinite(class_sep) and class_sep > 0):
            raise ValueError(f"class_sep must be a number > 0 (10 in Yu et al.'s code); got {class_sep!r}")
        self.patch_size = patch_size
        self.class_sep = float(class_sep)

    def points(self, labels: Tensor, dim: int, generator: torch.Generator) -> Tensor:
        """``(n, dim)`` points, one per label, from class-wise Gaussian clusters at hypercube vertices."""
        num_classes = int(labels.max()) + 1
        if num_classes > 2 ** dim:
            raise ValueError(f"LSP needs a distinct hypercube vertex per class, but {dim} coordinates give "
                             f"{2 ** dim} vertices for {num_classes} classes; lower patch_size")
        vertices: list[tuple[float, ...]] = []
        while len(vertices) < num_classes:  # distinct random vertices of {-1, 1}^dim
            vertex = tuple((torch.randint(0, 2, (dim,), generator=generator) * 2 - 1).tolist())
            if vertex not in vertices:
                vertices.append(vertex)
        centroids = torch.tensor(vertices, dtype=torch.float32) * self.class_sep
        maps = torch.rand((num_classes, dim, dim), generator=generator) * 2 - 1
        points = torch.randn((len(labels), dim), generator=generator)
        for c in range(num_classes):
            rows = labels == c
            points[rows] = points[rows] @ maps[c] + centroids[c]
        return points

    def perturbation(self, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
        channels, height, width = images.shape[1:]
        grid = _grid(height, width, self.patch_size)
        cells = self.points(labels.cpu(), channels * grid[0] * grid[1], generator).view(len(labels), channels, *grid)
        cells = cells.to(images.device)  # drawn on the CPU (the keyed stream), shaped on the attack's device
        return scale_to_ball(_upsample(cells, self.patch_size, height, width), self.eps, self.norm)


class LSPNoiseControl(LinearSeparablePerturbation):
    """LSP's random-noise control: the same patch-wise, upsampled perturbation on the same L2 sphere, with
    every sample's point drawn from one standard Gaussian, so that it carries no class structure.

    An attack's success counts only against noise of the same budget and bound; this is that noise for
    :class:`LinearSeparablePerturbation`.
    """

    name = "lsp_noise"

    def points(self, labels: Tensor, dim: int, generator: torch.Generator) -> Tensor:
        return torch.randn((len(labels), dim), generator=generator)


class ClasswiseLinearSeparablePerturbation(IndiscriminateAttack):
    """A class-wise variant of LSP: one patch-wise constant colour pattern per class, on the eps-sphere.

    The image is cut into ``patch_size`` squares and each square of class c's pattern takes one random
    value per channel (for l_inf, +-eps: a vertex of the ball, so the whole bound is used). Every image of
    a class gets the same pattern, unlike Yu et al.'s per-sample points
    (:class:`LinearSeparablePerturbation`).

    Args:
        eps: Bound in [0, 1] pixel units (l_inf 8/255, or an l2 bound).
        norm: ``"linf"`` or ``"l2"``.
        budget: Fraction of the training set perturbed.
        patch_size: Side of the constant-colour squares (8 on 32x32 CIFAR-10 and on 16x16 digits).
        progress: Unused; kept for the common interface.
        device: Where the perturbations are computed (``"auto"``, ``"cpu"``, ``"cuda[:i]"``, ``"mps"``); the random
            draws stay on the CPU, so the poisons are the same bytes on every device up to float rounding.

    Raises:
        ValueError: If ``patch_size`` < 1.

    Example::

        poisons = ClasswiseLinearSeparablePerturbation(eps=8 / 255, patch_size=8).craft(images, labels, seed=0)
    """

    name = "classwise_lsp"

    def __init__(self, eps: float, norm: str = "linf", budget: float = 1.0, patch_size: int = 8,
                 progress: bool = True, device: str = "auto") -> None:
        super().__init__(eps, norm, budget, progress, device)
        _check_patch_size(patch_size)
        self.patch_size = patch_size

    def perturbation(self, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
        num_classes = int(labels.max()) + 1
        channels, height, width = images.shape[1:]
        grid = _grid(height, width, self.patch_size)
        colours = (torch.rand((num_classes, channels, *grid), generator=generator) * 2 - 1).to(images.device)
        if self.norm == "linf":  # every square at a vertex of the ball (+-eps): the pattern uses the whole bound
            colours = colours.sign()
        patterns = _upsample(colours, self.patch_size, height, width)
        return scale_to_ball(patterns, self.eps, self.norm)[labels]

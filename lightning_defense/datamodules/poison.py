"""A clean-label poison set: which training samples an attacker changed, and how.

A :class:`PoisonSet` stores only the poisoned rows of a training split (their indices, perturbed
images and true labels) together with the threat model they were made under (norm and ``eps``) and,
when known, what the attack aims at (target images or a backdoor trigger). It is stored without pickle,
as ``.safetensors`` or ``.npz``.

Two levels of checks: :meth:`PoisonSet.check` needs only the set itself (finite pixels in [0, 1],
non-negative unique indices and labels); :meth:`PoisonSet.validate` also needs the clean base split, for
what only the base can tell: the ``eps`` budget of every perturbation, the clean labels and the index
range. :meth:`PoisonSet.load` runs ``check`` always and ``validate`` when given the base, and without the
base it refuses unless called with ``validate=False``: a file's declared ``eps`` means nothing until its
perturbations are measured against the clean images.

The threat model is the clean-label one of the poisoning benchmark of Schwarzschild et al., "Just How
Toxic is Data Poisoning?" (ICML 2021): a poison keeps its label and differs from the clean image by at
most ``eps`` in the declared norm, with pixels in [0, 1].
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_defense.core.store import atomic_write

__all__ = ["PoisonSet", "PoisonSetError"]

NORMS = ("linf", "l2")
KINDS = ("targeted", "backdoor", "indiscriminate")
SUFFIXES = (".safetensors", ".npz")

_HEADER_KEY = "poison_set"
_FORMAT = "lightning_defense.PoisonSet"
_VERSION = 1
_REQUIRED_TENSORS = ("indices", "images", "labels")
_OPTIONAL_TENSORS = ("target_images", "target_labels", "adversarial_labels", "trigger")
_HEADER_FIELDS = ("norm", "eps", "kind", "source_class", "target_class", "metadata")
# Float slack on top of the rounding tolerance, far below one 8-bit step (1/255 ~ 3.9e-3).
_FLOAT_SLACK = 1e-5


class PoisonSetError(ValueError):
    """A poison set is inconsistent, breaks its threat model, or cannot be read."""


@dataclass(eq=False)
class PoisonSet:
    """The poisoned rows of a training split and the threat model they obey.

    Args:
        indices: ``(P,)`` int64 indices into the base training split.
        images: ``(P, C, H, W)`` floating-point poisoned images in [0, 1].
        labels: ``(P,)`` int64 clean labels of the poisoned samples.
        norm: ``"linf"`` or ``"l2"``, the norm bounding each perturbation.
        eps: The perturbation bound in [0, 1] pixel units, e.g. ``8 / 255``.
        kind: ``"targeted"``, ``"backdoor"`` or ``"indiscriminate"``.
        target_images: ``(T, C, H, W)`` images the targeted attack wants misclassified.
        target_labels: ``(T,)`` true labels of the target images.
        adversarial_labels: ``(T,)`` labels the attacker wants the targets to get.
        trigger: ``(C, h, w)`` backdoor patch in [0, 1].
        source_class: Class whose inputs the backdoor trigger should flip.
        target_class: Class the backdoor trigger should flip them to.
        metadata: Free-form strings, e.g. ``{"attack": "witches_brew", "seed": "0"}``.

    Raises:
        PoisonSetError: If the fields are inconsistent with each other.

    Example::

        >>> base = torch.rand(10, 3, 4, 4)
        >>> ps = PoisonSet(torch.tensor([2]), base[2:3] * 0.99, torch.tensor([1]), "linf", 8 / 255)
        >>> ps.apply(base).shape
        torch.Size([10, 3, 4, 4])
    """

    indices: Tensor
    images: Tensor
    labels: Tensor
    norm: str
    eps: float
    kind: str = "targeted"
    target_images: Tensor | None = None
    target_labels: Tensor | None = None
    adversarial_labels: Tensor | None = None
    trigger: Tensor | None = None
    source_class: int | None = None
    target_class: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_tensor("indices", self.indices, ndim=1, integer=True)
        _check_tensor("images", self.images, ndim=4, integer=False)
        _check_tensor("labels", self.labels, ndim=1, integer=True)
        n = len(self.indices)
        if len(self.images) != n or len(self.labels) != n:
            raise PoisonSetError(
                f"indices, images and labels must have one row per poison, got lengths "
                f"{n}, {len(self.images)} and {len(self.labels)}"
            )
        if self.norm not in NORMS:
            raise PoisonSetError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.kind not in KINDS:
            raise PoisonSetError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, numbers.Real):
            raise PoisonSetError(f"eps must be a float, got {type(self.eps).__name__}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise PoisonSetError(f"eps must be a finite number > 0 in [0, 1] pixel units, got {self.eps}")
        self.eps = float(self.eps)
        self._check_targets()
        self._check_backdoor()
        if not isinstance(self.metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()
        ):
            raise PoisonSetError("metadata must be a dict of str to str; convert numbers with str()")

    def _check_targets(self) -> None:
        if self.target_images is None:
            for name in ("target_labels", "adversarial_labels"):
                if getattr(self, name) is not None:
                    raise PoisonSetError(f"{name} is given without target_images; pass target_images too")
            return
        _check_tensor("target_images", self.target_images, ndim=4, integer=False)
        if self.target_images.shape[1:] != self.images.shape[1:]:
            raise PoisonSetError(
                f"target_images have per-sample shape {tuple(self.target_images.shape[1:])} but the "
                f"poisons have {tuple(self.images.shape[1:])}"
            )
        for name in ("target_labels", "adversarial_labels"):
            value = getattr(self, name)
            if value is None:
                continue
            _check_tensor(name, value, ndim=1, integer=True)
            if len(value) != len(self.target_images):
                raise PoisonSetError(
                    f"{name} has {len(value)} entries but there are {len(self.target_images)} target_images"
                )

    def _check_backdoor(self) -> None:
        if self.trigger is not None:
            _check_tensor("trigger", self.trigger, ndim=3, integer=False)
            if self.trigger.shape[0] != self.images.shape[1]:
                raise PoisonSetError(
                    f"trigger has {self.trigger.shape[0]} channels but the images have {self.images.shape[1]}"
                )
            if self.trigger.numel() and (self.trigger.min() < 0 or self.trigger.max() > 1):
                raise PoisonSetError(
                    f"trigger pixels must lie in [0, 1], got min {self.trigger.min().item():.4g} and "
                    f"max {self.trigger.max().item():.4g}"
                )
        for name in ("source_class", "target_class"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise PoisonSetError(f"{name} must be an int or None, got {value!r}")

    def __len__(self) -> int:
        return len(self.indices)

    def perturbation_norms(self, base_images: Tensor) -> tuple[Tensor, Tensor]:
        """Per-poison perturbation norms against the clean images.

        Args:
            base_images: ``(N, C, H, W)`` clean training images.

        Returns:
            ``(linf, l2)``, two ``(P,)`` float64 tensors of the norms of ``images - base_images[indices]``.

        Raises:
            PoisonSetError: If an index is out of range or the image shapes differ.
        """
        self._check_rows(base_images)
        delta = self.images.detach().cpu().double() - base_images[self.indices.cpu()].detach().cpu().double()
        flat = delta.flatten(1)
        return flat.abs().amax(dim=1), flat.norm(dim=1)

    def check(self) -> None:
        """Check what needs no clean base split: finite pixels in [0, 1], non-negative unique indices and labels.

        The ``eps`` budget, the clean labels and the index range need the base: see :meth:`validate`.

        Raises:
            PoisonSetError: Naming the first violated rule and how to fix it.
        """
        for name in ("images", "target_images"):
            value = getattr(self, name)
            if value is None or not value.numel():
                continue
            if not torch.isfinite(value).all():
                row = int((~torch.isfinite(value)).flatten(1).any(1).nonzero()[0])
                raise PoisonSetError(f"{name}: row {row} holds NaN or infinite pixels; pixels must be finite, "
                                     f"in [0, 1]")
            if value.min() < 0 or value.max() > 1:
                raise PoisonSetError(
                    f"{name}: pixels must lie in [0, 1], got min {value.min().item():.4g} and max "
                    f"{value.max().item():.4g}; clamp the poisons or divide 8-bit data by 255"
                )
        if len(self) and int(self.indices.min()) < 0:
            raise PoisonSetError(f"indices: index {int(self.indices.min())} is negative; indices count from 0 "
                                 f"into the base training split")
        self._check_unique()
        for name in ("labels", "target_labels", "adversarial_labels"):
            value = getattr(self, name)
            if value is not None and value.numel() and int(value.min()) < 0:
                raise PoisonSetError(f"{name}: class index {int(value.min())} is negative; labels are class "
                                     f"indices >= 0")
        for name in ("source_class", "target_class"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise PoisonSetError(f"{name} is {value}; a class index is >= 0")

    def check_bound(self, eps: float, norm: str) -> None:
        """Check that the declared threat model is within ``eps`` in ``norm`` (e.g. a user's bound on a file).

        :meth:`validate` checks the perturbations against the declared ``eps``, so together they bound the
        perturbations by ``eps`` too.

        Raises:
            PoisonSetError: If the declared norm differs or the declared eps exceeds ``eps``.
        """
        if norm != self.norm:
            raise PoisonSetError(f"declares an {self.norm} bound but an {norm} bound was asked for; "
                                 f"compare bounds in the same norm")
        if self.eps > eps + _FLOAT_SLACK:
            raise PoisonSetError(f"declares {self.norm} eps={self.eps:.7g} ({self.eps * 255:.4g}/255), above the "
                                 f"allowed {eps:.7g}; these poisons are stronger than the threat model asked for")

    def validate(self, base_images: Tensor, base_labels: Tensor, rounding_tolerance: float = 1 / 255) -> None:
        """Check the poisons against the clean training split they were made from (and :meth:`check` them).

        Args:
            base_images: ``(N, C, H, W)`` clean training images in [0, 1].
            base_labels: ``(N,)`` clean training labels.
            rounding_tolerance: Slack per pixel for poisons stored as 8-bit images. The L2 bound gets
                ``rounding_tolerance * sqrt(d)`` for ``d`` pixels per image.

        Raises:
            PoisonSetError: Naming the first violated rule and how to fix it.
        """
        if len(base_labels) != len(base_images):
            raise PoisonSetError(
                f"base_labels has {len(base_labels)} entries but base_images has {len(base_images)} rows"
            )
        self._check_rows(base_images)
        self.check()
        self._check_budget(base_images, rounding_tolerance)
        expected = base_labels[self.indices.cpu()].cpu()
        wrong = (self.labels.cpu() != expected).nonzero().flatten()
        if len(wrong):
            j = int(wrong[0])
            raise PoisonSetError(
                f"labels: clean-label violated at {len(wrong)} poison(s); first is poison {j} (base index "
                f"{int(self.indices[j])}) with label {int(self.labels[j])} but the base label is "
                f"{int(expected[j])}; a clean-label poison must keep its true label"
            )

    def _check_rows(self, base_images: Tensor) -> None:
        n = len(base_images)
        if len(self):
            low, high = int(self.indices.min()), int(self.indices.max())
            if low < 0 or high >= n:
                bad = low if low < 0 else high
                raise PoisonSetError(
                    f"indices: index {bad} is out of range [0, {n}) for a base split of N={n} samples; "
                    f"check that the poisons were made for this training split"
                )
        self._check_unique()
        if self.images.shape[1:] != base_images.shape[1:]:
            raise PoisonSetError(
                f"images: per-sample shape {tuple(self.images.shape[1:])} differs from the base split's "
                f"{tuple(base_images.shape[1:])}; convert the poisons to the base layout (C, H, W)"
            )

    def _check_unique(self) -> None:
        unique, counts = self.indices.unique(return_counts=True)
        if (counts > 1).any():
            repeated = unique[counts > 1][:5].tolist()
            raise PoisonSetError(
                f"indices: duplicate indices {repeated}; each base sample may be poisoned at most once"
            )

    def _check_budget(self, base_images: Tensor, rounding_tolerance: float) -> None:
        linf, l2 = self.perturbation_norms(base_images)
        d = math.prod(self.images.shape[1:])
        if self.norm == "linf":
            norms, limit = linf, self.eps + rounding_tolerance
        else:
            norms, limit = l2, self.eps + rounding_tolerance * math.sqrt(d)
        if len(self) == 0 or norms.max() <= limit + _FLOAT_SLACK:
            return
        j = int(norms.argmax())
        raise PoisonSetError(
            f"images: perturbation exceeds eps={self.eps:.6g} in {self.norm} (allowed {limit:.6g} with "
            f"rounding tolerance); worst is poison {j} (base index {int(self.indices[j])}) with "
            f"{self.norm} norm {norms[j].item():.6g}; project the poisons onto the eps-ball or declare "
            f"the eps they were made with"
        )

    def apply(self, base_images: Tensor) -> Tensor:
        """Return a copy of ``base_images`` with the poisoned rows replaced.

        Args:
            base_images: ``(N, C, H, W)`` clean training images.

        Returns:
            The poisoned training images, same dtype and device as ``base_images``.
        """
        self._check_rows(base_images)
        poisoned = base_images.clone()
        poisoned[self.indices.to(base_images.device)] = self.images.to(base_images.device, base_images.dtype)
        return poisoned

    def save(self, path: str | os.PathLike) -> None:
        """Write the poison set atomically as ``.safetensors`` or ``.npz`` (chosen by suffix).

        Tensors are stored as arrays; ``norm``, ``eps``, ``kind``, the backdoor classes and ``metadata``
        go into a JSON header. Neither format uses pickle.

        Args:
            path: Destination file ending in ``.safetensors`` or ``.npz``.

        Raises:
            PoisonSetError: If the suffix is not one of the accepted ones.
        """
        path = Path(path)
        suffix = _format_of(path)
        tensors = {
            name: value.detach().cpu().contiguous()
            for name in _REQUIRED_TENSORS + _OPTIONAL_TENSORS
            if (value := getattr(self, name)) is not None
        }
        header = json.dumps(
            {"format": _FORMAT, "version": _VERSION, **{name: getattr(self, name) for name in _HEADER_FIELDS}}
        )
        if suffix == ".npz":
            arrays = {name: value.numpy() for name, value in tensors.items()}
            atomic_write(path, lambda handle: np.savez(handle, **arrays, **{_HEADER_KEY: np.array(header)}))
        else:
            from safetensors.torch import save

            atomic_write(path, save(tensors, metadata={_HEADER_KEY: header}))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        base_images: Tensor | None = None,
        base_labels: Tensor | None = None,
        *,
        validate: bool = True,
    ) -> PoisonSet:
        """Read a poison set written by :meth:`save`, without ever unpickling, and check it.

        The file's own content is always checked (:meth:`check`). Its declared ``eps`` budget and clean
        labels can only be checked against the clean base split (:meth:`validate`): pass ``base_images``
        and ``base_labels``, or ``validate=False`` to read the file without that check.

        Args:
            path: A ``.safetensors`` or ``.npz`` file.
            base_images: Clean training images; with ``base_labels``, the loaded set is validated.
            base_labels: Clean training labels.
            validate: With no base split, must be False (the budget is then left unchecked).

        Returns:
            The poison set.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            PoisonSetError: If the file is corrupt, lacks a key, holds pickled objects, fails
                :meth:`check`, or fails validation against the base split; or if neither the base nor
                ``validate=False`` is given.
        """
        path = Path(path)
        suffix = _format_of(path)
        if not path.is_file():
            raise FileNotFoundError(f"no poison set file at {path}")
        if (base_images is None) != (base_labels is None):
            raise PoisonSetError("pass both base_images and base_labels to validate, or neither")
        if base_images is None and validate:
            raise PoisonSetError(
                f"{path}: its eps budget and clean labels can only be checked against the clean training split; "
                f"pass base_images and base_labels, or validate=False to load it unchecked against the base"
            )
        try:
            tensors, header_text = _read_safetensors(path) if suffix == ".safetensors" else _read_npz(path)
        except PoisonSetError:
            raise
        except Exception as err:  # the readers raise many types on corrupt files
            raise PoisonSetError(f"{path}: cannot read as {suffix} ({type(err).__name__}: {err})") from err
        if header_text is None:
            raise PoisonSetError(f"{path}: missing key {_HEADER_KEY!r}; was it written by PoisonSet.save?")
        try:
            header = json.loads(header_text)
        except json.JSONDecodeError as err:
            raise PoisonSetError(f"{path}: key {_HEADER_KEY!r} is not valid JSON ({err})") from err
        if not isinstance(header, dict) or header.get("format") != _FORMAT:
            raise PoisonSetError(f"{path}: key {_HEADER_KEY!r} does not describe a {_FORMAT}")
        for name in _REQUIRED_TENSORS:
            if name not in tensors:
                raise PoisonSetError(f"{path}: missing key {name!r}")
        for name in _HEADER_FIELDS:
            if name not in header:
                raise PoisonSetError(f"{path}: missing key {name!r} in header {_HEADER_KEY!r}")
        unknown = sorted(set(tensors) - set(_REQUIRED_TENSORS + _OPTIONAL_TENSORS))
        if unknown:
            raise PoisonSetError(f"{path}: unexpected keys {unknown}")
        try:
            poison_set = cls(**tensors, **{name: header[name] for name in _HEADER_FIELDS})
            if base_images is None:
                poison_set.check()
            else:
                poison_set.validate(base_images, base_labels)
        except PoisonSetError as err:
            raise PoisonSetError(f"{path}: {err}") from err
        return poison_set


def _check_tensor(name: str, value: Any, ndim: int, integer: bool) -> None:
    if not isinstance(value, Tensor):
        raise PoisonSetError(f"{name} must be a torch.Tensor, got {type(value).__name__}; use torch.as_tensor")
    if value.ndim != ndim:
        raise PoisonSetError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if integer and value.dtype != torch.int64:
        raise PoisonSetError(f"{name} must be int64, got {value.dtype}; convert with .long()")
    if not integer and not value.is_floating_point():
        raise PoisonSetError(f"{name} must be floating point in [0, 1], got {value.dtype}; divide 8-bit data by 255")


def _format_of(path: Path) -> str:
    if path.suffix not in SUFFIXES:
        raise PoisonSetError(f"{path}: unsupported suffix {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
    return path.suffix


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], str | None]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        header = (handle.metadata() or {}).get(_HEADER_KEY)
    return tensors, header


def _read_npz(path: Path) -> tuple[dict[str, Tensor], str | None]:
    tensors: dict[str, Tensor] = {}
    header = None
    archive = np.load(path, allow_pickle=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise PoisonSetError(f"{path}: holds a single array, not an .npz archive of named arrays")
    with archive:
        for name in archive.files:
            try:
                array = archive[name]
            except ValueError as err:  # numpy refuses object arrays when allow_pickle=False
                raise PoisonSetError(
                    f"{path}: key {name!r} holds pickled Python objects, which are never loaded; "
                    f"store plain numeric arrays"
                ) from err
            if name == _HEADER_KEY:
                header = str(array)
            else:
                tensors[name] = torch.from_numpy(np.ascontiguousarray(array))
    return tensors, header

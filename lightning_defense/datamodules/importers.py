"""Import clean-label poisons made by other tools into a :class:`PoisonSet`.

Supported sources:

* IBM's Adversarial Robustness Toolbox (ART): ``attack.poison(x_trigger, y_trigger, x_train, y_train)``
  returns the whole poisoned training set as NumPy arrays (:func:`from_poisoned_arrays`).
* Geiping et al.'s poisoning toolkit ("Witches' Brew", ICLR 2021), export mode ``numpy``: the whole
  poisoned training set as ``poisoned_training_data.npy`` (N, H, W, C) with 0-255 values, and
  ``poisoned_training_labels.npy`` (:func:`from_npy`).
* The poisoning benchmark of Schwarzschild et al., "Just How Toxic is Data Poisoning?" (ICML 2021): a
  directory of ``poisons.pickle``, ``base_indices.pickle`` and ``target.pickle``
  (:func:`from_benchmark_pickles`). Pickles can run arbitrary code when loaded, so this importer
  refuses unless the caller passes ``trust_pickle=True``.

Every importer returns a poison set already validated against the clean base split.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_defense.datamodules.poison import PoisonSet, PoisonSetError

__all__ = ["UntrustedPickleError", "from_benchmark_pickles", "from_npy", "from_poisoned_arrays"]

# A pixel counts as changed when it moved by more than half an 8-bit step, so re-quantising a clean
# image to uint8 does not mark it as poisoned.
_CHANGE_THRESHOLD = 0.5 / 255 + 1e-6
_BENCHMARK_FILES = ("poisons.pickle", "base_indices.pickle", "target.pickle")


class UntrustedPickleError(PermissionError):
    """Refusal to unpickle files the caller has not declared trustworthy."""


def from_poisoned_arrays(
    poisoned_x: np.ndarray | Tensor,
    poisoned_y: np.ndarray | Tensor,
    base_images: Tensor,
    base_labels: Tensor,
    eps: float,
    norm: str = "linf",
    kind: str = "targeted",
    metadata: dict[str, str] | None = None,
) -> PoisonSet:
    """Import a full poisoned training set, as returned by ART's ``attack.poison(...)``.

    The poisons are the rows whose pixels differ from ``base_images`` by more than half an 8-bit step.

    Args:
        poisoned_x: ``(N, C, H, W)`` or ``(N, H, W, C)`` images, uint8 or float in [0, 1] (floats holding
            whole numbers in [0, 255] are read as 8-bit).
        poisoned_y: ``(N,)`` class indices or ``(N, K)`` one-hot labels.
        base_images: ``(N, C, H, W)`` clean float images in [0, 1].
        base_labels: ``(N,)`` clean int64 labels.
        eps: Perturbation bound in [0, 1] pixel units, e.g. ``8 / 255``.
        norm: ``"linf"`` or ``"l2"``.
        kind: ``"targeted"``, ``"backdoor"`` or ``"indiscriminate"``.
        metadata: Strings to keep with the poison set, e.g. the attack name.

    Returns:
        The validated poison set.

    Raises:
        PoisonSetError: On mismatched lengths or layouts, flipped labels, no poisoned rows, or poisons
            that break the threat model.
    """
    images = _to_unit_nchw(poisoned_x, tuple(base_images.shape[1:]), "poisoned_x")
    labels = _to_class_indices(poisoned_y, "poisoned_y")
    n = len(base_images)
    if len(images) != n or len(labels) != n:
        raise PoisonSetError(
            f"poisoned_x has {len(images)} rows and poisoned_y {len(labels)}, but the base split has {n}; "
            f"pass the whole poisoned training set, in the same order as the base split"
        )
    flipped = (labels != base_labels.cpu()).nonzero().flatten()
    if len(flipped):
        raise PoisonSetError(
            f"poisoned_y: labels differ from base_labels at rows {flipped[:5].tolist()}; a clean-label "
            f"poison keeps its true label"
        )
    delta = (images.double() - base_images.detach().cpu().double()).abs().flatten(1)
    indices = (delta > _CHANGE_THRESHOLD).any(dim=1).nonzero().flatten()
    if len(indices) == 0:
        raise PoisonSetError("poisoned_x: no row differs from base_images; is this the clean training set?")
    return _validated(
        base_images,
        base_labels,
        indices=indices,
        images=images[indices],
        labels=labels[indices],
        norm=norm,
        eps=eps,
        kind=kind,
        metadata=dict(metadata or {}),
    )


def from_npy(
    path: str | os.PathLike,
    base_images: Tensor,
    base_labels: Tensor,
    eps: float,
    labels_path: str | os.PathLike | None = None,
    norm: str = "linf",
    kind: str = "targeted",
    metadata: dict[str, str] | None = None,
) -> PoisonSet:
    """Import a ``.npy`` export of a whole poisoned training set.

    This reads Geiping's toolkit export ``poisoned_training_data.npy`` (with
    ``poisoned_training_labels.npy`` as ``labels_path``), or any array accepted by
    :func:`from_poisoned_arrays`. Files are loaded with ``allow_pickle=False``.

    Args:
        path: The ``.npy`` file of poisoned images.
        base_images: ``(N, C, H, W)`` clean float images in [0, 1].
        base_labels: ``(N,)`` clean int64 labels.
        eps: Perturbation bound in [0, 1] pixel units.
        labels_path: Optional ``.npy`` file of labels; the base labels are used when omitted.
        norm: ``"linf"`` or ``"l2"``.
        kind: ``"targeted"``, ``"backdoor"`` or ``"indiscriminate"``.
        metadata: Strings to keep with the poison set; ``"source"`` is set to ``path``.

    Returns:
        The validated poison set.

    Raises:
        FileNotFoundError: If ``path`` or ``labels_path`` does not exist.
        PoisonSetError: If a file is not a plain array, or as in :func:`from_poisoned_arrays`.
    """
    images = _load_npy(path)
    labels = base_labels if labels_path is None else _load_npy(labels_path)
    metadata = {"source": str(path), **(metadata or {})}
    return from_poisoned_arrays(images, labels, base_images, base_labels, eps, norm, kind, metadata)


def from_benchmark_pickles(
    directory: str | os.PathLike,
    base_images: Tensor,
    base_labels: Tensor,
    eps: float,
    trust_pickle: bool = False,
    norm: str = "linf",
    kind: str | None = None,
    adversarial_label: int | None = None,
    metadata: dict[str, str] | None = None,
) -> PoisonSet:
    """Import one trial of Schwarzschild et al.'s poisoning benchmark.

    The directory holds ``poisons.pickle`` (a list of ``(PIL image, label)``), ``base_indices.pickle``
    (their indices in the training set) and ``target.pickle``: ``(PIL image, label)`` for targeted
    attacks, or ``(PIL image, label, patch, [x, y])`` for backdoors, where ``patch`` is a ``(3, s, s)``
    trigger pasted at column ``x``, row ``y``.

    Args:
        directory: The trial directory.
        base_images: ``(N, C, H, W)`` clean float images in [0, 1].
        base_labels: ``(N,)`` clean int64 labels.
        eps: Perturbation bound in [0, 1] pixel units (the benchmark uses ``8 / 255``).
        trust_pickle: Must be True to load the pickles, which can execute code.
        norm: ``"linf"`` or ``"l2"``.
        kind: ``"targeted"`` or ``"backdoor"``; inferred from ``target.pickle`` when None.
        adversarial_label: The label the attacker wants for the target; by the benchmark's
            convention, the poisons' label when None.
        metadata: Strings to keep with the poison set; ``"source"`` is set to ``directory``.

    Returns:
        The validated poison set. For backdoors ``trigger`` is the patch, ``source_class`` the target's
        true class, ``target_class`` the adversarial label, and ``metadata["trigger_xy"]`` the patch
        position.

    Raises:
        FileNotFoundError: If the directory or one of its pickles is missing.
        UntrustedPickleError: If ``trust_pickle`` is False.
        PoisonSetError: On malformed content or poisons that break the threat model.
    """
    directory = Path(directory)
    for name in _BENCHMARK_FILES:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"benchmark directory {directory} has no {name}")
    if not trust_pickle:
        raise UntrustedPickleError(
            f"refusing to unpickle the files in {directory}: loading a pickle can run arbitrary code. "
            f"Only if you trust whoever made these files, pass trust_pickle=True."
        )
    poisons = _unpickle(directory / "poisons.pickle")
    base_indices = _unpickle(directory / "base_indices.pickle")
    target = _unpickle(directory / "target.pickle")

    per_sample_shape = tuple(base_images.shape[1:])
    if not isinstance(poisons, (list, tuple)) or not poisons or any(len(p) != 2 for p in poisons):
        raise PoisonSetError(f"{directory / 'poisons.pickle'}: expected a non-empty list of (image, label)")
    images = _to_unit_nchw(np.stack([np.asarray(image) for image, _ in poisons]), per_sample_shape, "poisons")
    labels = torch.tensor([int(label) for _, label in poisons], dtype=torch.int64)
    indices = torch.as_tensor(np.asarray(base_indices), dtype=torch.int64).flatten()
    if not isinstance(target, (list, tuple)) or len(target) not in (2, 4):
        raise PoisonSetError(
            f"{directory / 'target.pickle'}: expected (image, label) or (image, label, patch, [x, y])"
        )
    target_images = _to_unit_nchw(np.asarray(target[0])[None], per_sample_shape, "target image")
    target_label = int(target[1])
    if adversarial_label is None:
        adversarial_label = int(labels[0])
    kind = kind or ("backdoor" if len(target) == 4 else "targeted")
    fields: dict[str, Any] = dict(
        target_images=target_images,
        target_labels=torch.tensor([target_label]),
        adversarial_labels=torch.tensor([adversarial_label]),
        metadata={"source": str(directory), **(metadata or {})},
    )
    if len(target) == 4:
        patch = target[2].detach().cpu() if isinstance(target[2], Tensor) else torch.as_tensor(np.asarray(target[2]))
        x, y = (int(v) for v in target[3])
        fields.update(trigger=patch.float(), source_class=target_label, target_class=adversarial_label)
        fields["metadata"]["trigger_xy"] = f"{x},{y}"
    return _validated(
        base_images, base_labels, indices=indices, images=images, labels=labels, norm=norm, eps=eps, kind=kind, **fields
    )


def _validated(base_images: Tensor, base_labels: Tensor, **fields: Any) -> PoisonSet:
    """Build a poison set and check it against the base split."""
    poison_set = PoisonSet(**fields)
    poison_set.validate(base_images, base_labels)
    return poison_set


def _to_unit_nchw(array: np.ndarray | Tensor, per_sample_shape: tuple[int, ...], name: str) -> Tensor:
    """Convert NCHW or NHWC, uint8 or float, images to a float32 NCHW tensor in [0, 1]."""
    if isinstance(array, Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    channels_last = per_sample_shape[1:] + per_sample_shape[:1]
    if array.ndim == 3 and len(per_sample_shape) == 3 and per_sample_shape[0] == 1:
        array = array[..., None]  # grayscale without a channel axis
    if array.shape[1:] == per_sample_shape:
        pass
    elif array.shape[1:] == channels_last:
        array = np.moveaxis(array, -1, 1)
    else:
        raise PoisonSetError(
            f"{name}: per-sample shape {array.shape[1:]} matches neither the base layout {per_sample_shape} "
            f"(NCHW) nor {channels_last} (NHWC)"
        )
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float32) / 255)
    if not np.issubdtype(array.dtype, np.floating):
        raise PoisonSetError(f"{name}: expected uint8 or float pixels, got {array.dtype}")
    if array.size and array.max() > 1:
        if array.min() < 0 or array.max() > 255 or not np.array_equal(array, np.round(array)):
            raise PoisonSetError(
                f"{name}: float pixels range over [{array.min():.4g}, {array.max():.4g}], which is neither "
                f"[0, 1] nor whole 8-bit values; rescale to [0, 1]"
            )
        array = array / 255
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _to_class_indices(labels: np.ndarray | Tensor, name: str) -> Tensor:
    """Convert class indices or one-hot rows (ART's usual format) to an int64 tensor."""
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim == 2:
        labels = labels.argmax(axis=1)
    if labels.ndim != 1 or not np.array_equal(labels, np.round(labels)):
        raise PoisonSetError(f"{name}: expected (N,) class indices or (N, K) one-hot labels, got {labels.shape}")
    return torch.from_numpy(labels.astype(np.int64))


def _load_npy(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no .npy file at {path}")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:  # object arrays or a pickle in disguise
        raise PoisonSetError(f"{path}: not a plain numeric .npy array ({err}); pickled data is never loaded") from err
    if not isinstance(array, np.ndarray):
        raise PoisonSetError(f"{path}: holds an .npz archive, expected a single .npy array")
    return array


def _unpickle(path: Path) -> Any:
    with open(path, "rb") as handle:
        return pickle.load(handle)  # only reached with trust_pickle=True

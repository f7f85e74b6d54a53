"""One device choice for every stage that computes outside a ``Trainer``: attack crafting, surrogates,
feature extractors (and, through the same function, purification, Deep k-NN and certification).

:func:`resolve_device` turns a setting (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) into a
``torch.device``. ``"auto"`` follows the Trainer or Fabric the work belongs to (its rank's GPU), else the
current CUDA device, else the CPU. Every resolution that names its ``stage`` is recorded in the logs that
:func:`record_devices` opens, so a test can check which stage ran where without a GPU.

:func:`autocast` is the one place where mixed precision is switched on: ``precision="bf16"`` runs the
wrapped forward passes under ``torch.autocast`` with bfloat16; ``"32"`` (the default) changes nothing.

Example::

    device = resolve_device("auto", trainer, stage="purification")
    with record_devices() as log:
        attack.craft(images, labels, goal=goal)
    log.stages()  # {"witches_brew.craft": device(type="cpu"), "witches_brew.surrogate": ...}
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator, Optional, Union

import torch

from lightning_defense.core.collective import Collective

#: Accepted device settings (besides an index after ``cuda:``).
DEVICES = ("auto", "cpu", "cuda", "cuda:<i>", "mps")
#: Accepted precisions: full float32, or bfloat16 autocast of the forward passes.
PRECISIONS = ("32", "bf16")

DeviceLike = Union[str, torch.device]


class DeviceLog(list):
    """The ``(stage, device)`` pairs resolved while a :func:`record_devices` block ran, in order."""

    def stages(self) -> dict[str, torch.device]:
        """``stage -> device`` (the last resolution of each stage)."""
        return dict(self)


_LOGS: list[DeviceLog] = []


@contextlib.contextmanager
def record_devices() -> Iterator[DeviceLog]:
    """Record every :func:`resolve_device` call that names a ``stage`` while the block runs (for tests)."""
    log = DeviceLog()
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)


def check_device(device: Any, what: str = "device") -> DeviceLike:
    """``device`` if it is a valid setting (without looking at the hardware), else a ValueError naming ``what``."""
    if isinstance(device, torch.device):
        return device
    if isinstance(device, str):
        kind, _, index = device.partition(":")
        if device in ("auto", "cpu", "cuda", "mps") or (kind == "cuda" and index.isdigit()):
            return device
    raise ValueError(f"{what} must be one of 'auto', 'cpu', 'cuda', 'cuda:<index>' (e.g. 'cuda:1') or 'mps'; "
                     f"got {device!r}")


def check_precision(precision: Any, what: str = "precision") -> str:
    """``precision`` as a string if it is one of :data:`PRECISIONS` (``32`` as an int is accepted)."""
    text = str(precision) if isinstance(precision, (str, int)) and not isinstance(precision, bool) else None
    if text not in PRECISIONS:
        raise ValueError(f"{what} must be '32' (float32) or 'bf16' (bfloat16 autocast on a GPU); got {precision!r}")
    return text


def resolve_device(device: DeviceLike = "auto", collective: Any = None, *, stage: Optional[str] = None,
                   what: str = "device") -> torch.device:
    """The ``torch.device`` a stage computes on.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:<i>"``, ``"mps"`` or a ``torch.device``. ``"auto"``
            is the GPU of ``collective``'s rank when it computes on one, else the current CUDA device, else
            the CPU.
        collective: A :class:`~lightning_defense.core.collective.Collective`, a ``Trainer``, ``Strategy`` or
            ``Fabric`` (whose rank's device ``"auto"`` follows), or None.
        stage: A name for :func:`record_devices` (e.g. ``"witches_brew.surrogate"``); None records nothing.
        what: The setting's name in error messages (e.g. ``"attack.init_args.device"``).

    Raises:
        ValueError: ``device`` is not a device setting, or names a device this machine does not have.
    """
    check_device(device, what)
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        resolved = _auto(collective)
    else:
        resolved = torch.device(device)
    _check_available(resolved, device, what)
    if stage is not None:
        for log in _LOGS:
            log.append((stage, resolved))
    return resolved


def _auto(collective: Any) -> torch.device:
    if torch.cuda.is_available():
        own = _collective_device(collective)
        if own is not None and own.type == "cuda":
            return own
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective_device(owner: Any) -> Optional[torch.device]:
    """The device of a Collective, Trainer, Strategy or Fabric (None without one)."""
    collective = Collective.of(owner)
    return collective.device if collective.backend is not None else None


def _check_available(resolved: torch.device, setting: DeviceLike, what: str) -> None:
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what}={str(setting)!r} but torch sees no CUDA GPU on this machine; use 'auto' or 'cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"{what}={str(setting)!r} but this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s) (0..{torch.cuda.device_count() - 1}); use 'auto' or 'cuda:<index>'")
    elif resolved.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"{what}={str(setting)!r} but the MPS backend is not available here; use 'auto' or 'cpu'")


def autocast(device: torch.device, precision: str = "32"):
    """A context in which forward passes run at ``precision`` on ``device``.

    ``"32"`` is a no-op. ``"bf16"`` is ``torch.autocast`` with bfloat16 on CUDA (on a GPU without bfloat16
    support, and on other devices, it warns and stays in float32; the CPU gains nothing from it).
    Use it around the forward pass and the loss only; the backward pass and the optimiser step stay outside.
    """
    precision = check_precision(precision)
    if precision == "32":
        return contextlib.nullcontext()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    warnings.warn(f"precision='bf16' runs in float32 on {device} (bfloat16 autocast is used on CUDA GPUs that "
                  "support it)", stacklevel=2)
    return contextlib.nullcontext()

"""Classes named in configs: resolved and type-checked before anything is called.

A config names classes as ``class_path`` strings (LightningCLI's format). Importing the module is the only
code that runs before the check; the class must be a subclass of what the slot expects, so a config can
never call an arbitrary callable such as ``subprocess.run``.
"""

from __future__ import annotations

import importlib
from typing import Any, Union


def resolve_class(path: Union[str, type], expected: Union[type, tuple[type, ...]], what: str,
                  default_module: str | None = None) -> type:
    """The class ``path`` names (``pkg.module.Class``, or a bare name in ``default_module``), checked.

    Raises:
        ValueError: It cannot be imported, is not a class, or is not a subclass of ``expected``.
    """
    if isinstance(path, type):
        cls = path
    elif isinstance(path, str) and path:
        module_name, _, name = path.rpartition(".")
        module_name = module_name or default_module
        if not module_name:
            raise ValueError(f"{what}: {path!r} is not a dotted class path such as 'pkg.module.Class'")
        try:
            cls = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError, ValueError) as err:
            raise ValueError(f"{what}: cannot import class_path {path!r} ({err}); give a full path such as "
                             "'lightning_defense.datamodules.GaussianNoiseDataModule'") from err
    else:
        raise ValueError(f"{what} must be a class or a dotted class path such as 'pkg.module.Class'; got {path!r}")
    expected_tuple = expected if isinstance(expected, tuple) else (expected,)
    if not isinstance(cls, type) or not issubclass(cls, expected_tuple):
        names = " or ".join(e.__name__ for e in expected_tuple)
        raise ValueError(f"{what}: {path!r} is not a {names} class; a config may only name such classes")
    return cls


def instantiate(spec: Any, expected: Union[type, tuple[type, ...]], what: str, **extra: Any) -> Any:
    """Build ``{"class_path": ..., "init_args": {...}}`` after checking the class against ``expected``."""
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        raise ValueError(f"{what} must be a mapping with a 'class_path' string (and optional 'init_args'); got {spec!r}")
    unknown = set(spec) - {"class_path", "init_args"}
    if unknown:
        raise ValueError(f"{what}: unknown keys {sorted(unknown)}; use class_path and init_args")
    cls = resolve_class(spec["class_path"], expected, what)
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise ValueError(f"{what}: init_args must be a mapping; got {init_args!r}")
    return cls(**init_args, **extra)

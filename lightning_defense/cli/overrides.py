"""Dotted command-line overrides of config sections that are plain mappings (``evaluate``, ``poison``).

``--data.init_args.data_dir=/x``, ``--trainer.max_epochs 2`` or ``--attacks.wb.init_args.steps=2`` set one
entry inside a section read from ``--config``; the value is read as YAML (``2`` -> 2, ``false`` -> False).
List entries are addressed by position or, for entries with a ``name``, by name. An override that cannot
be applied (its path runs through a value that is not a mapping or list, or names no list entry) is an error.
"""

from __future__ import annotations

from typing import Any

import yaml


def split_overrides(argv: list[str], sections: set[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """``argv`` without the dotted overrides of ``sections``, and those overrides as ``(dotted.path, text)``.

    Raises:
        ValueError: An override has no value.
    """
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if "." in name and name.split(".", 1)[0] in sections:
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ValueError(f"--{name} needs a value, e.g. --{name}=VALUE")
                i += 1
                value = argv[i]
            overrides.append((name, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _child(node: Any, key: str, path: str, create: bool) -> tuple[Any, Any]:
    """``(container, key)`` of ``key`` in ``node`` (a mapping, or a list by position or entry name)."""
    if isinstance(node, dict):
        if create and node.get(key) is None:
            node[key] = {}
        return node, key
    if isinstance(node, list):
        names = [entry.get("name") if isinstance(entry, dict) else None for entry in node]
        if key in names:
            return node, names.index(key)
        if key.isdigit() and int(key) < len(node):
            return node, int(key)
        raise ValueError(f"{path} has no entry {key!r}: give a position 0..{len(node) - 1} or a name of {names}")
    raise ValueError(f"{path} is {node!r}, not a mapping or a list")


def apply_overrides(config: dict, overrides: list[tuple[str, str]]) -> None:
    """Set every ``(dotted.path, text)`` of :func:`split_overrides` in ``config`` (in place).

    Raises:
        ValueError: An override cannot be applied.
    """
    for dotted, text in overrides:
        keys = dotted.split(".")
        node, path = config, ""
        try:
            for key in keys[:-1]:
                container, index = _child(node, key, path or "the config", create=True)
                node, path = container[index], f"{path}.{key}" if path else key
            container, index = _child(node, keys[-1], path, create=False)
        except ValueError as err:
            raise ValueError(f"cannot apply --{dotted}={text}: {err}") from None
        container[index] = _yaml(text)

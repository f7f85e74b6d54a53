"""Registry of the ``lightning-defense`` subcommands that are not Trainer methods.

A module registers a command with ``@register_command("name")``; the function receives the remaining
command-line arguments. ``fit``, ``validate``, ``test`` and ``predict`` go to LightningCLI.
"""

from __future__ import annotations

from typing import Callable

COMMANDS: dict[str, Callable[[list[str]], None]] = {}
COMMAND_MODULES = [
    # Modules imported lazily so that their commands register; later features append here.
    "lightning_defense.attacks._commands",
    "lightning_defense.datamodules.diffusion_purified",
    "lightning_defense.diffusion.training",
    "lightning_defense.certify._cli",
]


def register_command(name: str) -> Callable[[Callable[[list[str]], None]], Callable[[list[str]], None]]:
    def decorator(fn: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
        if name in COMMANDS:
            raise ValueError(f"command {name!r} is registered twice")
        COMMANDS[name] = fn
        return fn

    return decorator


def load_commands() -> dict[str, Callable[[list[str]], None]]:
    import importlib

    for module in COMMAND_MODULES:
        importlib.import_module(module)
    return COMMANDS

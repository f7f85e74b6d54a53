"""The ``lightning-defense`` command line: one table of commands.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI's (:mod:`~lightning_defense.cli.fit`);
every other command is a function ``run(argv)`` of one module here, listed in :data:`COMMANDS`. A new
command is one module and one line in the table.
"""

from __future__ import annotations

import sys
import warnings
from typing import Callable, Optional

from lightning_defense.cli import certify, evaluate, poison, purify, train_denoiser
from lightning_defense.cli.fit import DefenseCLI, build_cli
from lightning_defense.core.collective import release_process_group
from lightning_defense.core.host_memory import reuse_freed_memory

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")

#: Command name -> function of the remaining arguments.
COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "poison": poison.run_poison,
    "evaluate": evaluate.run_evaluate,
    "purify": purify.run_purify,
    "train-denoiser": train_denoiser.run_train_denoiser,
    "certify": certify.run_certify,
    "certify-plot": certify.run_certify_plot,
}

__all__ = ["COMMANDS", "DefenseCLI", "build_cli", "main"]


#: Warnings from inside the libraries we call that a user cannot act on: kept out of the command line's output.
UPSTREAM_NOISE = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's own use of torch's pytree API
    r"Full backward hook is firing when gradients are computed with respect to module outputs",  # Opacus' hooks
)


def main(argv: Optional[list[str]] = None) -> None:
    reuse_freed_memory()  # CPU steps reuse their freed tensors (core.host_memory)
    for message in UPSTREAM_NOISE:
        warnings.filterwarnings("ignore", message=message)
    from_shell = argv is None  # then LightningCLI reads sys.argv itself (given both, it warns)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        COMMANDS[argv[0]](argv[1:])
    elif argv and not argv[0].startswith("-") and argv[0] not in TRAINER_COMMANDS:
        known = ", ".join(list(TRAINER_COMMANDS) + sorted(COMMANDS))
        sys.exit(f"lightning-defense: unknown command {argv[0]!r}; choose one of: {known}")
    else:
        build_cli(None if from_shell else argv)
    release_process_group()


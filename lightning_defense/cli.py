"""The ``lightning-defense`` command line, built on LightningCLI.

``fit``, ``validate``, ``test`` and ``predict`` take ``--config configs/...yaml`` with ``model``, ``data``
and ``trainer`` sections; ``--print_config`` prints a starting config. Other subcommands (``poison``,
``evaluate``, ``purify``, ``train-denoiser``, ``certify``) come from :mod:`lightning_defense._registry`.
"""

from __future__ import annotations

import sys
from typing import Optional

from lightning.pytorch.cli import LightningCLI

from lightning_defense import _registry
from lightning_defense.models.classifier import ImageClassifier

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


class DefenseCLI(LightningCLI):
    """LightningCLI with the data's ``num_classes`` / ``num_channels`` linked into the model.

    With ``test_after_fit: true`` the ``fit`` command ends by testing the fitted model.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False, help="Run the test split after fit.")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.num_channels", "model.in_chans", apply_on="instantiate")

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)


def build_cli(args: Optional[list[str]] = None, run: bool = True) -> DefenseCLI:
    """Build (and by default run) the LightningCLI for ``args``."""
    import lightning as L

    return DefenseCLI(
        ImageClassifier,
        L.LightningDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _registry.load_commands()
    if argv and argv[0] in commands:
        commands[argv[0]](argv[1:])
        return
    if argv and not argv[0].startswith("-") and argv[0] not in TRAINER_COMMANDS:
        known = ", ".join(list(TRAINER_COMMANDS) + sorted(commands))
        sys.exit(f"lightning-defense: unknown command {argv[0]!r}; choose one of: {known}")
    build_cli(argv)


if __name__ == "__main__":
    main()

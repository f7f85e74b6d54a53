"""The ``lightning-defense`` command line, built on LightningCLI.

``fit``, ``validate``, ``test`` and ``predict`` take ``--config configs/...yaml`` with ``model``, ``data``
and ``trainer`` sections; ``--print_config`` prints a starting config.
"""

from __future__ import annotations

from typing import Optional

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from lightning_defense.core.config import resolve_class
from lightning_defense.models.classifier import ImageClassifier

class DefenseCLI(LightningCLI):
    """LightningCLI with the data's ``num_classes`` / ``num_channels`` linked into the model.

    With ``test_after_fit: true`` the ``fit`` command ends by testing the fitted model.

    The fit configs name a ``ModelCheckpoint(save_last=True)`` in place of Lightning's default one (its
    ``last.ckpt`` is what a run resumes from); like the default one it goes away with
    ``--trainer.enable_checkpointing=false``.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False, help="Run the test split after fit.")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.num_channels", "model.in_chans", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer")
        if trainer is None or trainer.get("enable_checkpointing") is not False or not trainer.get("callbacks"):
            return
        trainer["callbacks"] = [
            callback for callback in trainer["callbacks"]
            if not (isinstance(getattr(callback, "class_path", None), str)
                    and issubclass(resolve_class(callback.class_path, object, "trainer.callbacks"), ModelCheckpoint))
        ]

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

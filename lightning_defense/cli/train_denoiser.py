"""``lightning-defense train-denoiser --config cfg.yaml``: train a DDPM denoiser and save it in diffusers format."""

from __future__ import annotations

import lightning as L

from lightning_defense.diffusion.training import DiffusionModel


def run_train_denoiser(argv: list[str]) -> None:
    """``lightning-defense train-denoiser --config cfg.yaml``: train a :class:`DiffusionModel`, save it (diffusers).

    The config has ``model`` (DiffusionModel arguments), ``data`` (a datamodule; only its training split
    is used), ``trainer`` and ``output_dir``.
    """
    from lightning_defense.cli.fit import IntBatchLimitsCLI

    class DenoiserCLI(IntBatchLimitsCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--output_dir", type=str, required=True, help="where the diffusers model goes")

    cli = DenoiserCLI(
        DiffusionModel, L.LightningDataModule, subclass_mode_data=True, args=argv, run=False,
        save_config_kwargs={"overwrite": True},
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)  # no validation_step: only the training split is read
    if cli.trainer.is_global_zero:
        path = cli.model.save_pretrained(cli.config["output_dir"])
        print(f"denoiser saved to {path}")
    cli.trainer.strategy.barrier()

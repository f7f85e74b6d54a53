"""``lightning-defense purify --config cfg.yaml``: run a config's purification job once (sharded under torchrun)."""

from __future__ import annotations

import os
from typing import Optional

import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.fabric import Fabric

from lightning_defense.core.collective import Collective
from lightning_defense.datamodules.diffusion_purified import DiffusionPurifiedDataModule
from lightning_defense.datamodules.eclipse import EclipseDataModule


def run_purify(argv: list[str]) -> None:
    """``lightning-defense purify --config cfg.yaml``: run the purification job of a config's ``data``.

    The config is the one ``fit`` takes (its ``model`` and ``trainer`` sections are ignored); ``data`` must be
    a :class:`DiffusionPurifiedDataModule` or an :class:`EclipseDataModule` (which first trains its sparse-set
    DDPM). Under ``torchrun`` (``WORLD_SIZE`` > 1) a DDP ``Fabric`` shares the work over the processes;
    otherwise one process does it all. Prints the cache directory.
    """
    parser = ArgumentParser(prog="lightning-defense purify", description=run_purify.__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_subclass_arguments((DiffusionPurifiedDataModule, EclipseDataModule), "data", required=True)
    parser.add_argument("--model", type=dict, default={}, help="ignored (so that fit configs work)")
    parser.add_argument("--trainer", type=dict, default={}, help="ignored (so that fit configs work)")
    parser.add_argument("--seed_everything", type=Optional[int], default=None, help="ignored")
    parser.add_argument("--test_after_fit", type=bool, default=False, help="ignored")
    config = parser.parse_args(argv)
    datamodule = parser.instantiate_classes(config).data
    collective = Collective()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        fabric = Fabric(accelerator="cuda" if torch.cuda.is_available() else "cpu", strategy="ddp",
                        devices=local, num_nodes=world_size // local)
        fabric.launch()  # under torchrun: joins the process group the launcher set up
        collective = Collective(fabric)
    datamodule.use_collective(collective)
    cache = datamodule.purify()
    if collective.rank == 0:
        print(f"purified training set: {cache.directory}")

"""``lightning-defense purify --config cfg.yaml``: run a config's purification job once (sharded under torchrun)."""

from __future__ import annotations

from typing import Optional

import torch

from lightning_defense.datamodules.diffusion_purified import DiffusionPurifiedDataModule


def run_purify(argv: list[str]) -> None:
    """``lightning-defense purify --config cfg.yaml``: run the purification job of a config's ``data``.

    The config is the one ``fit`` takes (its ``model`` and ``trainer`` sections are ignored); ``data`` must be
    a :class:`DiffusionPurifiedDataModule`. Under ``torchrun`` the work is sharded over the processes.
    Prints the cache directory.
    """
    import os

    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="lightning-defense purify", description=run_purify.__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_subclass_arguments(DiffusionPurifiedDataModule, "data", required=True)
    parser.add_argument("--model", type=dict, default={}, help="ignored (so that fit configs work)")
    parser.add_argument("--trainer", type=dict, default={}, help="ignored (so that fit configs work)")
    parser.add_argument("--seed_everything", type=Optional[int], default=None, help="ignored")
    parser.add_argument("--test_after_fit", type=bool, default=False, help="ignored")
    config = parser.parse_args(argv)
    datamodule = parser.instantiate_classes(config).data
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    cache = datamodule.purify()
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"purified training set: {cache.directory}")

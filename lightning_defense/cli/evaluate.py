"""``lightning-defense evaluate``: the papers' protocol (:mod:`lightning_defense.evaluate`), one table."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from lightning_defense.cli.overrides import apply_overrides, split_overrides
from lightning_defense.evaluate import Evaluation, EvaluationConfig

SECTIONS = {"data", "attacks", "defenses", "model", "trainer"}


def _evaluate_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lightning-defense evaluate",
                            description="Run the papers' protocol: T trials of attack x defense, one table.")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--data", type=dict, required=True, help="class_path/init_args of the clean datamodule")
    parser.add_argument("--attacks", type=list, default=[],
                        help="list of {name, class_path, init_args, victim: {model, trainer, callbacks, transfer}}")
    parser.add_argument("--defenses", type=list, default=[], help="list of {name, callbacks: [...], wrapper: {...}}")
    parser.add_argument("--model", type=dict, default={}, help="ImageClassifier arguments of the victim")
    parser.add_argument("--trainer", type=dict, default={}, help="lightning.Trainer arguments of the victim")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", type=str, default="runs/evaluate")
    parser.add_argument("--poison", type=Optional[str], default=None,
                        help="evaluate this poison file instead of crafting (.safetensors/.npz/.npy/benchmark dir)")
    parser.add_argument("--poison_eps", type=Optional[float], default=None,
                        help="bound of a .npy or benchmark poison; for a .safetensors/.npz PoisonSet, the largest "
                             "declared eps accepted (its perturbations are checked against the declared eps)")
    parser.add_argument("--poison_norm", type=str, default="linf", help="linf or l2: the norm of --poison_eps")
    parser.add_argument("--poison_kind", type=Optional[str], default=None,
                        help="targeted, backdoor or indiscriminate: the kind of a .npy or benchmark poison")
    parser.add_argument("--trust_pickle", type=bool, default=False, help="allow a benchmark pickle directory")
    parser.add_argument("--progress", type=bool, default=True)
    parser.add_argument("--clean_row", type=bool, default=True,
                        help="train the clean row (needed by indiscriminate attacks; false skips it for tables "
                             "of targeted and backdoor attacks only)")
    parser.add_argument("--device", type=str, default="auto",
                        help="where attacks craft unless their init_args name a device: auto (the victims' GPU, or "
                             "the CPU under trainer.accelerator=cpu), cpu, cuda, cuda:<i> or mps")
    return parser


def evaluation_config(argv: list[str]) -> EvaluationConfig:
    """The :class:`EvaluationConfig` that ``lightning-defense evaluate argv...`` runs.

    Dotted overrides of the sections (``--trainer.max_epochs=2``, ``--data.init_args.data_dir=/x``,
    ``--attacks.wb.init_args.steps=2``) are applied to the config's mappings; see
    :mod:`~lightning_defense.cli.overrides`.
    """
    try:
        argv, overrides = split_overrides(argv, SECTIONS)
    except ValueError as err:
        sys.exit(f"lightning-defense evaluate: {err}")
    args = _evaluate_parser().parse_args(argv)
    fields = {k: _plain(v) for k, v in vars(args).items() if k != "config"}
    if fields["poison"] is not None and not Path(fields["poison"]).exists():
        sys.exit(f"lightning-defense evaluate: --poison {fields['poison']} does not exist")
    try:
        apply_overrides(fields, overrides)
    except ValueError as err:
        sys.exit(f"lightning-defense evaluate: {err}")
    return EvaluationConfig(**fields)


#: Loggers whose info is one "GPU available" banner per victim: quiet while ``evaluate`` trains its victims.
BANNER_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric")


@contextmanager
def banners_quieted() -> Iterator[None]:
    """:data:`BANNER_LOGGERS` at WARNING inside, their own levels again after (the process's logging is not ours)."""
    loggers = [logging.getLogger(name) for name in BANNER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def run_evaluate(argv: list[str]) -> None:
    """Run (or resume) the evaluation and print the "(accuracy) success" table."""
    with banners_quieted():
        config = evaluation_config(argv)
        evaluation = Evaluation(config)
        _, table = evaluation.report(evaluation.run())
    if evaluation.rank != 0:  # under DDP every rank runs the trials; rank 0 reports
        return
    print(table)
    if evaluation.collective.is_distributed:
        print(f"\nvictims trained with DDP on {evaluation.collective.world_size} processes")
    print(f"\nwritten: {Path(config.output_dir) / 'table.md'} (.csv, .json); per-trial results under "
          f"{Path(config.output_dir) / 'trials'}")


def _plain(value):
    """jsonargparse Namespaces -> dicts (nested), so configs reach the harness as plain data."""
    if isinstance(value, Namespace):
        return {k: _plain(v) for k, v in vars(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value

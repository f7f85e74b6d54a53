"""The papers' evaluation protocol: T trials of attack x defense, each on a fresh victim, and one table.

* :mod:`~lightning_defense.evaluate.config`: :class:`EvaluationConfig`, :class:`Defense`, :class:`Victim`.
* :mod:`~lightning_defense.evaluate.victims`: :func:`train_victim`, :func:`attack_success`, DDP batch shards.
* :mod:`~lightning_defense.evaluate.protocol`: :class:`Evaluation` and :func:`evaluate` (resumable trials).
* :mod:`~lightning_defense.evaluate.tables`: the "(accuracy) success" table (Markdown, CSV, JSON).
"""

from lightning_defense.evaluate.config import CLEAN_ROW, NO_DEFENSE, Defense, EvaluationConfig, Victim
from lightning_defense.evaluate.protocol import Evaluation, evaluate, load_poison_file, trial_seed
from lightning_defense.evaluate.tables import markdown_table, summarise, write_tables
from lightning_defense.evaluate.victims import attack_success, shard_loader, shard_loaders, train_victim

__all__ = [
    "CLEAN_ROW",
    "Defense",
    "Evaluation",
    "EvaluationConfig",
    "NO_DEFENSE",
    "Victim",
    "attack_success",
    "evaluate",
    "load_poison_file",
    "markdown_table",
    "shard_loader",
    "shard_loaders",
    "summarise",
    "train_victim",
    "trial_seed",
    "write_tables",
]

"""The papers' evaluation protocol: T trials of craft (or load) -> train a fresh victim per defense -> score.

Hong et al. (Sec. 4) and Schwarzschild et al. run each attack many times, each time on a random target
and random classes, train a victim on the poisoned data, and report the clean test accuracy and the
attack success, averaged over the runs; a table cell reads "(accuracy) success". Here each trial

1. builds the clean datamodule from the config and picks the trial's goal (seeded per trial);
2. crafts the poisons (cached per trial) or loads a given poison file;
3. for "none" and every configured defense, trains a fresh victim with a plain Lightning ``Trainer.fit``
   (so defense callbacks run), on ``wrapper(base=PoisonedDataModule(data, poisons))``;
4. measures clean test accuracy and :class:`AttackSuccessRate`.

A "clean" row (no attack) is trained per trial too: it gives each defense's clean accuracy and the
reference accuracy from which an indiscriminate attack's success (the accuracy drop) is measured.
Every (row, defense, trial) result is written atomically as soon as it is known, keyed by a hash of all
that determines it, so a rerun skips finished work.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch import Tensor

from lightning_defense.attacks._common import Attack, apply_trigger
from lightning_defense.attacks.metrics import AttackSuccessRate
from lightning_defense.datamodules.poison import PoisonSet
from lightning_defense.datamodules.poisoned import PoisonedDataModule
from lightning_defense.models.classifier import ImageClassifier

NO_DEFENSE = "none"
CLEAN_ROW = "clean"


def instantiate(spec: Any, what: str, **extra: Any) -> Any:
    """Build ``{"class_path": ..., "init_args": {...}}`` (LightningCLI's format), with ``extra`` keyword args."""
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        raise ValueError(f"{what} must be a mapping with a 'class_path' string (and optional 'init_args'); got {spec!r}")
    module_name, _, class_name = spec["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{what}: cannot import class_path {spec['class_path']!r} ({err})") from err
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise ValueError(f"{what}: init_args must be a mapping; got {init_args!r}")
    return cls(**init_args, **extra)


@dataclass
class Defense:
    """A defense from the config: a name, callbacks and an optional data wrapper (given ``base=``)."""

    name: str
    callbacks: list = field(default_factory=list)
    wrapper: Optional[dict] = None

    @classmethod
    def from_config(cls, spec: Any, position: int) -> "Defense":
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise ValueError(f"defenses[{position}] needs a non-empty 'name' (and optional 'callbacks', 'wrapper'); got {spec!r}")
        unknown = set(spec) - {"name", "callbacks", "wrapper"}
        if unknown:
            raise ValueError(f"defenses[{position}] ({spec['name']}): unknown keys {sorted(unknown)}; use name, callbacks, wrapper")
        callbacks = spec.get("callbacks") or []
        if not isinstance(callbacks, list):
            raise ValueError(f"defenses[{position}] ({spec['name']}): callbacks must be a list of class_path/init_args")
        return cls(spec["name"], callbacks, spec.get("wrapper"))


@dataclass
class EvaluationConfig:
    """Everything :func:`evaluate` needs; see ``configs/digits/evaluate.yaml``."""

    data: dict
    attacks: list
    defenses: list = field(default_factory=list)
    model: dict = field(default_factory=dict)
    trainer: dict = field(default_factory=dict)
    trials: int = 3
    seed: int = 0
    output_dir: str = "runs/evaluate"
    poison: Optional[str] = None
    poison_eps: Optional[float] = None
    poison_norm: str = "linf"
    trust_pickle: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.trials, int) or self.trials < 1:
            raise ValueError(f"trials must be an int >= 1; got {self.trials!r}")
        if not isinstance(self.data, dict):
            raise ValueError(f"data must be a class_path/init_args mapping; got {self.data!r}")
        if self.poison is None and not self.attacks:
            raise ValueError("attacks is empty: configure at least one attack, or pass --poison PATH")
        names = [d.get("name") if isinstance(d, dict) else None for d in self.defenses]
        if NO_DEFENSE in names or len(set(names)) != len(names):
            raise ValueError(f"defense names must be unique and not {NO_DEFENSE!r} (always run); got {names}")
        attack_names = [a.get("name") if isinstance(a, dict) else None for a in self.attacks]
        if len(set(attack_names)) != len(attack_names) or CLEAN_ROW in attack_names:
            raise ValueError(f"attack names must be unique and not {CLEAN_ROW!r}; got {attack_names}")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def trial_seed(seed: int, trial: int) -> int:
    """The seed of one trial: goals, crafting and victims of trial t never depend on other trials."""
    return int(seed) * 100_003 + int(trial)


def train_victim(config: EvaluationConfig, defense: Defense, poisons: Optional[PoisonSet], seed: int, root: Path):
    """Train a fresh victim with ``defense`` on the (poisoned) data; returns ``(model, datamodule, test accuracy)``."""
    L.seed_everything(seed, workers=True, verbose=False)
    data = instantiate(config.data, "data")
    if poisons is not None:
        data = PoisonedDataModule(data, poisons)
    if defense.wrapper is not None:
        data = instantiate(defense.wrapper, f"defenses[{defense.name}].wrapper", base=data)
    callbacks = [instantiate(c, f"defenses[{defense.name}].callbacks") for c in defense.callbacks]
    model = ImageClassifier(**{**config.model, "num_classes": data.num_classes, "in_chans": data.num_channels})
    trainer_args = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root))
    trainer_args.update(config.trainer)
    trainer = L.Trainer(**trainer_args, callbacks=callbacks)
    trainer.fit(model, datamodule=data)
    accuracy = float(trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"])
    return model.eval(), data, accuracy


def attack_success(model: ImageClassifier, poisons: PoisonSet, test_set, clean_accuracy: float, accuracy: float) -> float:
    """Success of one trial: targeted / backdoor rate on the goal inputs, or the accuracy drop."""
    device = next(model.parameters()).device
    if poisons.kind == "indiscriminate":
        return clean_accuracy - accuracy
    metric = AttackSuccessRate(poisons.kind)
    with torch.no_grad():
        if poisons.kind == "targeted":
            if poisons.target_images is None or poisons.adversarial_labels is None:
                raise ValueError("a targeted PoisonSet needs target_images and adversarial_labels to be scored")
            metric.update(model(poisons.target_images.to(device)).cpu(), poisons.adversarial_labels.cpu())
        else:
            if poisons.trigger is None or poisons.source_class is None or poisons.target_class is None:
                raise ValueError("a backdoor PoisonSet needs trigger, source_class and target_class to be scored")
            images, labels = test_set.tensors() if hasattr(test_set, "tensors") else _tensors(test_set)
            source = images[labels == poisons.source_class]
            triggered = apply_trigger(source, poisons.trigger, poisons.metadata.get("trigger_xy"))
            metric.update(model(triggered.to(device)).cpu(), torch.full((len(source),), poisons.target_class))
    return float(metric.compute())


def _tensors(dataset) -> tuple[Tensor, Tensor]:
    from lightning_defense.datamodules._base import dataset_tensors

    return dataset_tensors(dataset)


def load_poison_file(config: EvaluationConfig, images: Tensor, labels: Tensor) -> PoisonSet:
    """Read ``config.poison`` with the importer its format needs, validated against the training split."""
    from lightning_defense.datamodules.importers import from_benchmark_pickles, from_npy

    path = Path(config.poison)
    if path.is_dir():
        if config.poison_eps is None:
            raise ValueError(f"--poison {path} is a benchmark directory: pass --poison_eps (e.g. 0.0313725 for 8/255)")
        return from_benchmark_pickles(path, images, labels, config.poison_eps, trust_pickle=config.trust_pickle,
                                      norm=config.poison_norm)
    if path.suffix == ".npy":
        if config.poison_eps is None:
            raise ValueError(f"--poison {path} is a .npy export: pass --poison_eps (the bound it was crafted with)")
        return from_npy(path, images, labels, config.poison_eps, norm=config.poison_norm)
    if path.suffix in (".safetensors", ".npz"):
        return PoisonSet.load(path, base_images=images, base_labels=labels)
    raise ValueError(f"--poison {path}: expected a .safetensors/.npz PoisonSet, a .npy export or a benchmark directory")


class Evaluation:
    """Runs :func:`evaluate`'s trials with resuming; see the module docstring.

    Args:
        config: The evaluation settings.
    """

    def __init__(self, config: EvaluationConfig) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        self.defenses = [Defense(NO_DEFENSE)] + [Defense.from_config(d, i) for i, d in enumerate(config.defenses)]
        self.attacks: dict[str, Attack] = {}
        for i, spec in enumerate(config.attacks if config.poison is None else []):
            if not isinstance(spec, dict) or not spec.get("name"):
                raise ValueError(f"attacks[{i}] needs a 'name' besides class_path/init_args; got {spec!r}")
            attack = instantiate({k: v for k, v in spec.items() if k != "name"}, f"attacks[{i}] ({spec['name']})")
            if not isinstance(attack, Attack):
                raise ValueError(f"attacks[{i}] ({spec['name']}): {type(attack).__name__} is not a lightning_defense Attack")
            attack.progress = attack.progress and config.progress
            self.attacks[spec["name"]] = attack
        self.specs = {spec["name"]: spec for spec in config.attacks}
        self.executed = 0  # victims trained by this run (the rest were resumed from disk)

    def _base_key(self) -> dict:
        c = self.config
        return {"data": c.data, "model": c.model, "trainer": c.trainer, "seed": c.seed}

    def _result_path(self, row: str, defense: str, trial: int) -> Path:
        return self.out / "trials" / row / defense / f"trial_{trial:04d}.json"

    def _poisons(self, row: str, trial: int, seed: int, images, labels, test_images, test_labels, num_classes) -> PoisonSet:
        if self.config.poison is not None:
            return load_poison_file(self.config, images, labels)
        attack = self.attacks[row]
        key = _digest({**self._base_key(), "attack": self.specs[row], "trial_seed": seed})
        path = self.out / "poisons" / row / f"trial_{trial:04d}.safetensors"
        if path.is_file():
            cached = PoisonSet.load(path, base_images=images, base_labels=labels)
            if cached.metadata.get("cache_key") == key:
                return cached
        goal = attack.sample_goal(test_images, test_labels, num_classes, seed)
        poisons = attack.craft(images, labels, goal=goal, seed=seed)
        poisons.metadata["cache_key"] = key
        path.parent.mkdir(parents=True, exist_ok=True)
        poisons.save(path)
        return poisons

    def _run_cell(self, row, defense, trial, seed, poisons, clean_accuracy) -> dict:
        spec = None if row == CLEAN_ROW else (self.specs.get(row) or {"poison": self.config.poison})
        key = _digest({**self._base_key(), "attack": spec, "defense": defense.__dict__, "trial_seed": seed})
        path = self._result_path(row, defense.name, trial)
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("key") == key:
                return record
        model, data, accuracy = train_victim(self.config, defense, poisons, seed, self.out / "lightning")
        self.executed += 1
        record = {"attack": row, "defense": defense.name, "trial": trial, "seed": seed, "key": key, "accuracy": accuracy,
                  "kind": None if poisons is None else poisons.kind, "success": None}
        if poisons is not None:
            record["success"] = attack_success(model, poisons, data.test_set, clean_accuracy, accuracy)
            if poisons.kind == "targeted":
                record["target_label"] = int(poisons.target_labels[0]) if poisons.target_labels is not None else None
                record["adversarial_label"] = int(poisons.adversarial_labels[0])
            record["num_poisons"] = len(poisons)
        _atomic_write(path, json.dumps(record, indent=1))
        return record

    def run(self) -> list[dict]:
        """Run (or resume) every trial; returns all per-trial records."""
        c = self.config
        rows = list(self.attacks) if c.poison is None else [Path(c.poison).stem]
        records = []
        for trial in range(c.trials):
            seed = trial_seed(c.seed, trial)
            base = instantiate(c.data, "data")
            base.prepare_data()
            base.setup("fit")
            images, labels = base.train_tensors() if hasattr(base, "train_tensors") else _tensors(base.train_set)
            test_images, test_labels = _tensors(base.test_set)
            clean = {}
            for defense in self.defenses:
                record = self._run_cell(CLEAN_ROW, defense, trial, seed, None, None)
                clean[defense.name] = record["accuracy"]
                records.append(record)
            for row in rows:
                poisons = self._poisons(row, trial, seed, images, labels, test_images, test_labels, base.num_classes)
                for defense in self.defenses:
                    records.append(self._run_cell(row, defense, trial, seed, poisons, clean[NO_DEFENSE]))
        return records


def summarise(records: list[dict]) -> list[dict]:
    """Mean and standard error (std with ddof=1 over sqrt(T); 0 for one trial) per (attack, defense)."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        cells.setdefault((r["attack"], r["defense"]), []).append(r)
    summary = []
    for (attack, defense), rs in cells.items():
        entry = {"attack": attack, "defense": defense, "trials": len(rs), "kind": rs[0]["kind"]}
        for metric in ("accuracy", "success"):
            values = [r[metric] for r in rs if r[metric] is not None]
            mean, se = _mean_se(values)
            entry[f"{metric}_mean"], entry[f"{metric}_se"] = mean, se
        summary.append(entry)
    return summary


def _mean_se(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def _pct(mean: Optional[float], se: Optional[float]) -> str:
    return "-" if mean is None else f"{100 * mean:.1f}±{100 * se:.1f}"


def markdown_table(summary: list[dict]) -> str:
    """The papers' table: one row per attack, one column per defense, cells "(accuracy) success" in %."""
    attacks = list(dict.fromkeys(s["attack"] for s in summary))
    defenses = list(dict.fromkeys(s["defense"] for s in summary))
    lookup = {(s["attack"], s["defense"]): s for s in summary}
    lines = ["| attack | kind | " + " | ".join(defenses) + " |", "|---|---|" + "---|" * len(defenses)]
    for attack in attacks:
        kind = next((s["kind"] for s in summary if s["attack"] == attack), None) or "-"
        cells = []
        for d in defenses:
            s = lookup.get((attack, d))
            cells.append("" if s is None else f"({_pct(s['accuracy_mean'], s['accuracy_se'])}) "
                         f"{_pct(s['success_mean'], s['success_se'])}")
        lines.append(f"| {attack} | {kind} | " + " | ".join(cells) + " |")
    trials = max((s["trials"] for s in summary), default=0)
    lines.append("")
    lines.append(f"Cells: (clean test accuracy %) attack success %, mean ± standard error over {trials} trial(s). "
                 "Success is the target→adversarial rate (targeted), the triggered→target rate (backdoor), "
                 "or the drop in test accuracy from the clean undefended model (indiscriminate).")
    return "\n".join(lines)


def write_tables(summary: list[dict], out: Path) -> str:
    """Write ``table.md``, ``table.csv`` and ``table.json`` into ``out``; returns the Markdown."""
    text = markdown_table(summary)
    _atomic_write(out / "table.md", text + "\n")
    _atomic_write(out / "table.json", json.dumps(summary, indent=1))
    buffer = io.StringIO()
    fields = ["attack", "defense", "kind", "trials", "accuracy_mean", "accuracy_se", "success_mean", "success_se"]
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(summary)
    _atomic_write(out / "table.csv", buffer.getvalue())
    return text


def evaluate(config: EvaluationConfig) -> tuple[list[dict], str]:
    """Run the protocol and write the tables; returns ``(summary, markdown)``.

    Example::

        summary, table = evaluate(EvaluationConfig(data={...}, attacks=[...], defenses=[...], trials=3))
    """
    evaluation = Evaluation(config)
    records = evaluation.run()
    summary = summarise(records)
    return summary, write_tables(summary, Path(config.output_dir))

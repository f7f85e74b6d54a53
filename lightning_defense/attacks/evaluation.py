"""The papers' evaluation protocol: T trials of craft (or load) -> train a fresh victim per defense -> score.

Hong et al. (Sec. 4) and Schwarzschild et al. run each attack many times, each time on a random target
and random classes, train a victim on the poisoned data, and report the clean test accuracy and the
attack success, averaged over the runs; a table cell reads "(accuracy) success". Here each trial

1. builds the clean datamodule from the config and picks the trial's goal (seeded per trial);
2. crafts the poisons (cached per trial) or loads a given poison file;
3. for "none" and every configured defense, trains a fresh victim with a plain Lightning ``Trainer.fit``
   (so defense callbacks run), on ``wrapper(base=PoisonedDataModule(data, poisons))``;
4. measures clean test accuracy and :class:`AttackSuccessRate`.

A backdoor attack's entry may fix its ``goal: {source_class, target_class}``, the same pair in every
trial (trials then differ in their crafting and victim seeds), for datasets where the backdoor works on
some pairs only.

An attack entry may carry a ``victim:`` mapping: ``model`` and ``trainer`` entries that override the global
ones for that attack's victims, extra ``callbacks``, and ``transfer: true`` for feature-collision attacks
(Poison Frogs, Bullseye Polytope), whose victim is the attack's own feature extractor, frozen
(:class:`~lightning_defense.callbacks.LinearProbe`), with a fresh linear head trained on the poisoned set.
The extractor is written once per attack to ``output_dir/extractors/<attack>.safetensors`` (or read from
the attack's ``extractor_path``); crafting and the victim both load that file.

Under DDP (``trainer: {strategy: ddp, devices: 2}``) Lightning re-runs the command for every rank, so every
rank walks the same trials: global rank 0 crafts and writes the poisons (and extractors) and the results,
the others wait at a barrier and read the files. Each rank trains on its share of every global batch of
the 1-process loader (not Lightning's ``DistributedSampler``), tests on its share of the test split with
the accuracy reduced over ranks, and scores the attack with rank 0's weights, so the table is the
1-process table up to floating-point summation order and what differs by construction: per-rank
BatchNorm statistics and per-rank random augmentation (see :func:`shard_loader`).

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
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, Sampler

from lightning_defense.attacks._common import Attack, AttackGoal, apply_trigger
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
class Victim:
    """The victim an attack is evaluated on: the global ``model``/``trainer``, overridden per attack.

    Args:
        model: ImageClassifier arguments that replace the global ``model``'s.
        trainer: Trainer arguments that replace the global ``trainer``'s.
        callbacks: Extra callbacks (class_path/init_args), run before the defense's.
        transfer: Transfer learning: start from the attack's feature extractor and freeze it
            (:class:`~lightning_defense.callbacks.LinearProbe`); only the head is trained. The victim's
            ``model`` must build the extractor's architecture (``backbone``, ``backbone_kwargs``) and use its
            normalisation (the attacks' extractors use ImageClassifier's default ``mean``/``std``).
    """

    model: dict = field(default_factory=dict)
    trainer: dict = field(default_factory=dict)
    callbacks: list = field(default_factory=list)
    transfer: bool = False

    @classmethod
    def from_config(cls, spec: Any, what: str) -> "Victim":
        if spec is None:
            return cls()
        if not isinstance(spec, dict):
            raise ValueError(f"{what}.victim must be a mapping with model, trainer, callbacks, transfer; got {spec!r}")
        unknown = set(spec) - {"model", "trainer", "callbacks", "transfer"}
        if unknown:
            raise ValueError(f"{what}.victim: unknown keys {sorted(unknown)}; use model, trainer, callbacks, transfer")
        for key, kind in (("model", dict), ("trainer", dict), ("callbacks", list), ("transfer", bool)):
            if key in spec and not isinstance(spec[key], kind):
                raise ValueError(f"{what}.victim.{key} must be a {kind.__name__}; got {spec[key]!r}")
        return cls(**spec)


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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _global_rank() -> int:
    """This process's global rank: from torch.distributed, else the launcher's environment (0 when alone)."""
    if _distributed():
        return dist.get_rank()
    from lightning.fabric.utilities.rank_zero import _get_rank

    return _get_rank() or 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


class _RankBatches(Sampler):
    """Rank ``rank``'s share of every batch of ``batch_sampler`` (a strided slice; never empty)."""

    def __init__(self, batch_sampler, rank: int, world_size: int) -> None:
        self.batch_sampler, self.rank, self.world_size = batch_sampler, rank, world_size

    def __iter__(self):
        for batch in self.batch_sampler:
            batch = list(batch)
            share = batch[self.rank::self.world_size]
            yield share if share else batch[-1:]

    def __len__(self) -> int:
        return len(self.batch_sampler)


def shard_loader(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """The loader one of ``world_size`` DDP processes uses so that together they see ``loader``'s batches.

    Every rank draws the same global batches as one process would (same sampler, same seed) and keeps
    every ``world_size``-th sample of each. DDP averages the ranks' gradients, so a step equals the
    1-process step when the shares are equally large; test metrics reduced over ranks count every sample
    once. A final batch smaller than ``world_size`` is repeated on the ranks left without a sample.
    """
    if world_size <= 1:
        return loader
    if isinstance(loader.dataset, IterableDataset) or loader.batch_sampler is None:
        raise ValueError(f"evaluate under DDP needs map-style datasets with a batch_size; got a loader over "
                         f"{type(loader.dataset).__name__} (set trainer.use_distributed_sampler: true to use "
                         "Lightning's DistributedSampler instead)")
    return DataLoader(loader.dataset, batch_sampler=_RankBatches(loader.batch_sampler, rank, world_size),
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      worker_init_fn=loader.worker_init_fn, persistent_workers=loader.persistent_workers,
                      generator=loader.generator)


def _shard_loaders(trainer: L.Trainer) -> None:
    """Make every loader ``trainer`` runs a rank shard (see :func:`shard_loader`).

    The shards are cut where the strategy processes each loader (``Strategy.process_dataloader``), so
    loaders that callbacks swap in during fit (``WarmStart``'s purified data) are sharded too. A loader
    whose sampler already splits by rank (``DistributedSampler``, Opacus' distributed Poisson sampler) is
    left as it is.
    """
    original = trainer.strategy.process_dataloader

    def process_dataloader(dataloader):
        dataloader = original(dataloader)
        samplers = (getattr(dataloader, "sampler", None), getattr(dataloader, "batch_sampler", None))
        if not isinstance(dataloader, DataLoader) or any(hasattr(s, "num_replicas") for s in samplers):
            return dataloader
        return shard_loader(dataloader, trainer.global_rank, trainer.world_size)

    trainer.strategy.process_dataloader = process_dataloader


def _share_rank_zero_weights(model: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers (BatchNorm statistics differ per rank) to every rank."""
    if _distributed():
        with torch.no_grad():
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)


def train_victim(config: EvaluationConfig, defense: Defense, poisons: Optional[PoisonSet], seed: int, root: Path,
                 victim: Optional[Victim] = None, extractor: Optional[str] = None):
    """Train a fresh victim with ``defense`` on the (poisoned) data; returns ``(model, datamodule, test accuracy)``.

    ``victim`` overrides the global model/trainer and adds callbacks; with ``victim.transfer`` the model
    starts from the ``extractor`` file, frozen, and only its head is trained.
    """
    from lightning_defense.callbacks.linear_probe import LinearProbe

    victim = victim or Victim()
    L.seed_everything(seed, workers=True, verbose=False)
    data = instantiate(config.data, "data")
    if poisons is not None:
        data = PoisonedDataModule(data, poisons)
    if defense.wrapper is not None:
        data = instantiate(defense.wrapper, f"defenses[{defense.name}].wrapper", base=data)
    callbacks = [LinearProbe(checkpoint_path=extractor)] if victim.transfer else []
    callbacks += [instantiate(c, "victim.callbacks") for c in victim.callbacks]
    callbacks += [instantiate(c, f"defenses[{defense.name}].callbacks") for c in defense.callbacks]
    model_args = {**config.model, **victim.model}
    model = ImageClassifier(**{**model_args, "num_classes": data.num_classes, "in_chans": data.num_channels})
    trainer_args = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root), use_distributed_sampler=False)
    trainer_args.update(config.trainer)
    trainer_args.update(victim.trainer)
    trainer = L.Trainer(**trainer_args, callbacks=callbacks)
    if not trainer_args["use_distributed_sampler"]:
        _shard_loaders(trainer)
    trainer.fit(model, datamodule=data)
    _share_rank_zero_weights(model)
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
    from lightning_defense.core.batch import dataset_tensors

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
        self.victims: dict[str, Victim] = {}
        self.goals: dict[str, Optional[AttackGoal]] = {}
        for i, spec in enumerate(config.attacks if config.poison is None else []):
            if not isinstance(spec, dict) or not spec.get("name"):
                raise ValueError(f"attacks[{i}] needs a 'name' besides class_path/init_args; got {spec!r}")
            attack = instantiate({k: v for k, v in spec.items() if k != "name"}, f"attacks[{i}] ({spec['name']})")
            if not isinstance(attack, Attack):
                raise ValueError(f"attacks[{i}] ({spec['name']}): {type(attack).__name__} is not a lightning_defense Attack")
            attack.progress = attack.progress and config.progress and _global_rank() == 0
            self.attacks[spec["name"]] = attack
            victim = Victim.from_config(spec.get("victim"), f"attacks[{i}] ({spec['name']})")
            self.victims[spec["name"]] = victim
            self.goals[spec["name"]] = _fixed_goal(spec.get("goal"), attack, f"attacks[{i}] ({spec['name']})")
            if victim.transfer and not hasattr(attack, "save_extractor"):
                raise ValueError(f"attacks[{i}] ({spec['name']}): victim.transfer needs an attack with a fixed feature "
                                 f"extractor (PoisonFrogs, BullseyePolytope); {type(attack).__name__} has none")
        self.specs = {spec["name"]: spec for spec in config.attacks}
        self.extractors: dict[str, tuple[str, str]] = {}  # attack -> (extractor file, its sha256)
        self.executed = 0  # victims trained by this run (the rest were resumed from disk)

    def _base_key(self) -> dict:
        c = self.config
        return {"data": c.data, "model": c.model, "trainer": c.trainer, "seed": c.seed}

    def _result_path(self, row: str, defense: str, trial: int) -> Path:
        return self.out / "trials" / row / defense / f"trial_{trial:04d}.json"

    def _shared_file(self, path: Path, is_valid, write) -> None:
        """Global rank 0 writes ``path`` when it is missing or stale; every rank then waits until it is there."""
        if not is_valid(path):
            if _global_rank() == 0:
                write(path)
            elif not _distributed():
                raise RuntimeError(f"rank {_global_rank()} is not connected to rank 0 and {path} is missing")
        _barrier()

    def _extractor(self, row: str, images: Tensor, labels: Tensor) -> tuple[str, str]:
        """The transfer victim's extractor file of ``row`` (written once, then used by crafting and victims)."""
        if row not in self.extractors:
            attack = self.attacks[row]
            if attack.extractor_path is not None:
                path = Path(attack.extractor_path)
            else:
                key = _digest({"data": self.config.data, "attack": _attack_args(self.specs[row])})
                path = self.out / "extractors" / f"{row}.safetensors"

                def is_valid(p: Path) -> bool:
                    return p.is_file() and _safetensors_metadata(p).get("cache_key") == key

                self._shared_file(path, is_valid,
                                  lambda p: attack.save_extractor(p, images, labels, {"cache_key": key}))
                attack.extractor, attack.extractor_path = None, str(path)  # craft against the file's weights
            self.extractors[row] = (str(path), hashlib.sha256(path.read_bytes()).hexdigest())
        return self.extractors[row]

    def _poisons(self, row: str, trial: int, seed: int, images, labels, test_images, test_labels, num_classes) -> PoisonSet:
        if self.config.poison is not None:
            return load_poison_file(self.config, images, labels)
        attack = self.attacks[row]
        extra = {"extractor_sha256": self.extractors[row][1]} if row in self.extractors else {}
        key = _digest({**self._base_key(), "attack": _attack_args(self.specs[row]), "trial_seed": seed, **extra})
        path = self.out / "poisons" / row / f"trial_{trial:04d}.safetensors"

        def is_valid(p: Path) -> bool:
            return p.is_file() and json.loads(_safetensors_metadata(p).get("poison_set", "{}")).get(
                "metadata", {}).get("cache_key") == key

        def craft(p: Path) -> None:
            goal = self.goals.get(row)
            if goal is None:
                goal = attack.sample_goal(test_images, test_labels, num_classes, seed)
            elif not {goal.source_class, goal.target_class} <= set(range(num_classes)):
                raise ValueError(f"attack {row!r}: goal classes {goal.source_class}, {goal.target_class} must be in "
                                 f"0..{num_classes - 1}")
            poisons = attack.craft(images, labels, goal=goal, seed=seed)
            poisons.metadata["cache_key"] = key
            p.parent.mkdir(parents=True, exist_ok=True)
            poisons.save(p)

        self._shared_file(path, is_valid, craft)
        return PoisonSet.load(path, base_images=images, base_labels=labels)  # every rank scores the same file

    def _run_cell(self, row, defense, trial, seed, poisons, clean_accuracy) -> dict:
        spec = None if row == CLEAN_ROW else (self.specs.get(row) or {"poison": self.config.poison})
        victim = self.victims.get(row)
        extractor, extra = None, {}
        if victim is not None and victim.transfer:
            extractor, sha256 = self.extractors[row]
            extra = {"extractor_sha256": sha256}
        key = _digest({**self._base_key(), "attack": spec, "defense": defense.__dict__, "trial_seed": seed, **extra})
        path = self._result_path(row, defense.name, trial)
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("key") == key:
                return record
        model, data, accuracy = train_victim(self.config, defense, poisons, seed, self.out / "lightning",
                                             victim=victim, extractor=extractor)
        self.executed += 1
        record = {"attack": row, "defense": defense.name, "trial": trial, "seed": seed, "key": key, "accuracy": accuracy,
                  "kind": None if poisons is None else poisons.kind, "success": None}
        if poisons is not None:
            record["success"] = attack_success(model, poisons, data.test_set, clean_accuracy, accuracy)
            if poisons.kind == "targeted":
                record["target_label"] = int(poisons.target_labels[0]) if poisons.target_labels is not None else None
                record["adversarial_label"] = int(poisons.adversarial_labels[0])
            record["num_poisons"] = len(poisons)
        if _global_rank() == 0:
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
                if row in self.victims and self.victims[row].transfer:
                    self._extractor(row, images, labels)
                poisons = self._poisons(row, trial, seed, images, labels, test_images, test_labels, base.num_classes)
                for defense in self.defenses:
                    records.append(self._run_cell(row, defense, trial, seed, poisons, clean[NO_DEFENSE]))
        _barrier()  # rank 0 has written every result
        return records


def _fixed_goal(spec: Any, attack: Attack, what: str) -> Optional[AttackGoal]:
    """The ``goal:`` of an attack entry: a backdoor's fixed ``{source_class, target_class}``, or None."""
    if spec is None:
        return None
    if attack.kind != "backdoor":
        raise ValueError(f"{what}.goal fixes a backdoor's source_class and target_class; {type(attack).__name__} "
                         f"is a {attack.kind} attack, whose trials draw their own goals")
    if (not isinstance(spec, dict) or set(spec) != {"source_class", "target_class"}
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in spec.values())):
        raise ValueError(f"{what}.goal must be {{source_class: int, target_class: int}}; got {spec!r}")
    if spec["source_class"] == spec["target_class"]:
        raise ValueError(f"{what}.goal: source_class and target_class must differ; got both {spec['source_class']}")
    return AttackGoal(source_class=spec["source_class"], target_class=spec["target_class"])


def _attack_args(spec: dict) -> dict:
    """What determines an attack's poisons: its entry without the victim."""
    return {k: v for k, v in spec.items() if k != "victim"}


def _safetensors_metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception:  # noqa: BLE001 - a truncated or foreign file is simply stale
        return {}


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
    if _global_rank() == 0:
        return summary, write_tables(summary, Path(config.output_dir))
    return summary, markdown_table(summary)

"""The papers' evaluation protocol: T trials of craft (or load) -> train a fresh victim per defense -> score.

Hong et al. (Sec. 4) and Schwarzschild et al. run each attack many times, each time on a random target
and random classes, train a victim on the poisoned data, and report the clean test accuracy and the
attack success, averaged over the runs; a table cell reads "(accuracy) success". Here each trial

1. builds the clean datamodule from the config and picks the trial's goal (seeded per trial);
2. crafts the poisons (cached per trial) or loads a given poison file, and checks that each set can be
   scored (targets, or trigger and classes), all before any victim of the trial trains;
3. for "none" and every configured defense, trains a fresh victim with a plain Lightning ``Trainer.fit``
   (so defense callbacks run), on ``wrapper(base=PoisonedDataModule(data, poisons))``;
4. measures clean test accuracy and :class:`~lightning_defense.attacks.AttackSuccessRate`.

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
BatchNorm statistics and per-rank random augmentation (see
:func:`~lightning_defense.evaluate.victims.shard_loader`).

Attacks craft on ``config.device`` (``"auto"``: the victims' GPU, or the CPU when the victim trainer has
``accelerator: cpu``) unless their ``init_args`` name a ``device``; victims train on their trainer's accelerator.

A "clean" row (no attack) is trained per trial too: it gives each defense's clean accuracy and the
reference accuracy from which an indiscriminate attack's success (the accuracy drop) is measured.
Every (row, defense, trial) result is written atomically as soon as it is known, with its SHA-256 beside it
(a :class:`~lightning_defense.core.store.RecordStore` under ``output_dir/trials``) and keyed by a fingerprint
of all that determines it, so a rerun skips finished work. A result that does not match its digest (a
flipped digit, a truncated file), cannot be read, or was written for another configuration is reported
by file name and its victim trained again; it is never used.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.fabric.utilities.rank_zero import _get_rank
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_defense.attacks.base import Attack, AttackGoal
from lightning_defense.core.batch import dataset_tensors
from lightning_defense.core.collective import Collective
from lightning_defense.core.config import instantiate, resolve_class
from lightning_defense.core.device import resolve_device
from lightning_defense.core.store import DIGEST_SUFFIX, CorruptStoreError, RecordStore, file_digest, fingerprint
from lightning_defense.datamodules.importers import from_benchmark_pickles, from_npy
from lightning_defense.datamodules.poison import PoisonSet, PoisonSetError
from lightning_defense.evaluate.config import (
    CLEAN_ROW,
    NO_DEFENSE,
    Defense,
    EvaluationConfig,
    Victim,
    crafting_device,
    fixed_goal,
)
from lightning_defense.evaluate.tables import duration, markdown_table, summarise, write_tables
from lightning_defense.evaluate.victims import attack_success, check_scorable, train_victim


# The key of the store of results under output_dir/trials; each result carries the key of its own settings.
RESULTS_KEY = {"records": "evaluate trial results", "version": 1}


def trial_seed(seed: int, trial: int) -> int:
    """The seed of one trial: goals, crafting and victims of trial t never depend on other trials."""
    return int(seed) * 100_003 + int(trial)


def _key(obj: Any) -> str:
    """The cache key of a result, poison set or extractor: a fingerprint of all that determines it."""
    return fingerprint(obj)[:16]


def load_poison_file(config: EvaluationConfig, images: Tensor, labels: Tensor) -> PoisonSet:
    """Read ``config.poison`` with the importer its format needs, validated against the training split.

    A ``.npy`` export or benchmark directory declares no bound: ``--poison_eps`` (and ``--poison_norm``) is
    its bound, and ``--poison_kind`` its kind. A ``.safetensors``/``.npz`` PoisonSet declares its own; with
    ``--poison_eps`` given, the declared bound must be in ``--poison_norm`` and not exceed ``--poison_eps``,
    so the perturbations (validated against the declared bound) are within ``--poison_eps`` too.
    """
    path = Path(config.poison)
    kind = {} if config.poison_kind is None else {"kind": config.poison_kind}
    if path.is_dir():
        if config.poison_eps is None:
            raise ValueError(f"--poison {path} is a benchmark directory: pass --poison_eps (e.g. 0.0313725 for 8/255)")
        return from_benchmark_pickles(path, images, labels, config.poison_eps, trust_pickle=config.trust_pickle,
                                      norm=config.poison_norm, **kind)
    if path.suffix == ".npy":
        if config.poison_eps is None:
            raise ValueError(f"--poison {path} is a .npy export: pass --poison_eps (the bound it was crafted with)")
        return from_npy(path, images, labels, config.poison_eps, norm=config.poison_norm, **kind)
    if path.suffix in (".safetensors", ".npz"):
        poisons = PoisonSet.load(path, base_images=images, base_labels=labels)
        if config.poison_kind is not None and poisons.kind != config.poison_kind:
            raise ValueError(f"--poison {path} holds a PoisonSet of kind {poisons.kind!r} but --poison_kind is "
                             f"{config.poison_kind!r}; drop --poison_kind (a PoisonSet file declares its kind)")
        if config.poison_eps is not None:
            try:
                poisons.check_bound(config.poison_eps, config.poison_norm)
            except PoisonSetError as err:
                raise PoisonSetError(f"--poison {path} {err} (--poison_eps {config.poison_eps}, --poison_norm "
                                     f"{config.poison_norm})") from err
        return poisons
    raise ValueError(f"--poison {path}: expected a .safetensors/.npz PoisonSet, a .npy export or a benchmark directory")


def _check_classes(config: EvaluationConfig, defenses: list[Defense], victims: dict[str, Victim]) -> None:
    """Resolve every class the config names against its slot's type before anything is built or trained."""
    specs = [(config.data, L.LightningDataModule, "data")]
    for d in defenses:
        if d.wrapper is not None:
            specs.append((d.wrapper, L.LightningDataModule, f"defenses[{d.name}].wrapper"))
        specs += [(c, L.Callback, f"defenses[{d.name}].callbacks") for c in d.callbacks]
    for name, victim in victims.items():
        specs += [(c, L.Callback, f"attacks[{name}].victim.callbacks") for c in victim.callbacks]
    for spec, expected, what in specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
            raise ValueError(f"{what} must be a mapping with a 'class_path' string (and optional 'init_args'); "
                             f"got {spec!r}")
        resolve_class(spec["class_path"], expected, what)


class Evaluation:
    """Runs :func:`evaluate`'s trials with resuming; see the module docstring.

    Args:
        config: The evaluation settings.

    Ranks come from :attr:`collective`: the last victim trainer's (under DDP Lightning starts the other
    ranks at the first ``fit``); before any, the launcher's environment gives the rank and the process is
    alone.
    """

    def __init__(self, config: EvaluationConfig) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        self.collective = Collective()
        self.defenses = [Defense(NO_DEFENSE)] + [Defense.from_config(d, i) for i, d in enumerate(config.defenses)]
        self.attacks: dict[str, Attack] = {}
        self.victims: dict[str, Victim] = {}
        self.goals: dict[str, Optional[AttackGoal]] = {}
        for i, spec in enumerate(config.attacks if config.poison is None else []):
            if not isinstance(spec, dict) or not spec.get("name"):
                raise ValueError(f"attacks[{i}] needs a 'name' besides class_path/init_args; got {spec!r}")
            what = f"attacks[{i}] ({spec['name']})"
            unknown = set(spec) - {"name", "class_path", "init_args", "victim", "goal"}
            if unknown:
                raise ValueError(f"{what}: unknown keys {sorted(unknown)}; use name, class_path, init_args, victim, goal")
            victim = Victim.from_config(spec.get("victim"), what)
            attack = instantiate({k: v for k, v in spec.items() if k not in ("name", "victim", "goal")}, Attack, what)
            attack.progress = attack.progress and config.progress and self.rank == 0
            device = crafting_device(config, spec, victim)
            if device is not None:
                attack.device = device
            resolve_device(attack.device, what=f"{what} device")  # a device this machine lacks fails before any fit
            self.attacks[spec["name"]] = attack
            self.victims[spec["name"]] = victim
            self.goals[spec["name"]] = fixed_goal(spec.get("goal"), attack, what)
            if attack.kind == "indiscriminate" and not config.clean_row:
                raise ValueError(f"{what}: an indiscriminate attack's success is the drop from the clean row; "
                                 f"set clean_row: true (or leave it out), or evaluate it in another table")
            if victim.transfer and not hasattr(attack, "save_extractor"):
                raise ValueError(f"{what}: victim.transfer needs an attack with a fixed feature "
                                 f"extractor (PoisonFrogs, BullseyePolytope); {type(attack).__name__} has none")
        _check_classes(config, self.defenses, self.victims)
        self.specs = {spec["name"]: spec for spec in config.attacks}
        self.extractors: dict[str, tuple[str, str]] = {}  # attack -> (extractor file, its sha256)
        self.executed = 0  # victims trained by this run (the rest were resumed from disk)
        self._results: Optional[RecordStore] = None

    @property
    def rank(self) -> int:
        """This process's global rank (0 when alone)."""
        return self.collective.rank if self.collective.backend is not None else (_get_rank() or 0)

    def _base_key(self) -> dict:
        c = self.config
        return {"data": c.data, "model": c.model, "trainer": c.trainer, "seed": c.seed}

    @property
    def results(self) -> Optional[RecordStore]:
        """The store of per-trial results (``output_dir/trials``); rank 0 creates it, the other ranks read it
        once it is there (None before: then there is no result to resume)."""
        if self._results is None and (self.rank == 0 or (self.out / "trials" / RecordStore.KEY_FILE).is_file()):
            self._results = RecordStore(self.out / "trials", RESULTS_KEY)
        return self._results

    def _resumed(self, name: str, key: str) -> Optional[dict]:
        """The stored result ``name`` when it is intact and has ``key``; otherwise None, with a warning naming
        the file when one is there but damaged, unreadable, half written or of another configuration."""
        store = self.results
        if store is None:
            return None
        path = store.path(name)
        if not path.is_file() and not path.with_name(path.name + DIGEST_SUFFIX).is_file():
            return None  # not computed yet
        try:
            record = store.load_json(name)
        except (FileNotFoundError, CorruptStoreError) as err:
            rank_zero_warn(f"{err}; not using it: training that victim again")
            return None
        if not isinstance(record, dict) or record.get("key") != key:
            found = record.get("key") if isinstance(record, dict) else None
            rank_zero_warn(f"{path} holds the result of other settings (key {found!r}, expected {key!r}); "
                           "training that victim again")
            return None
        return record

    def _shared_file(self, path: Path, is_valid, write) -> None:
        """Global rank 0 writes ``path`` when it is missing or stale; every rank then waits until it is there."""
        if not is_valid(path):
            if self.rank == 0:
                write(path)
            elif not self.collective.is_distributed:
                raise RuntimeError(f"rank {self.rank} is not connected to rank 0 and {path} is missing")
        self.collective.barrier("evaluate.shared_file")

    def _extractor(self, row: str, images: Tensor, labels: Tensor) -> tuple[str, str]:
        """The transfer victim's extractor file of ``row`` (written once, then used by crafting and victims)."""
        if row not in self.extractors:
            attack = self.attacks[row]
            if attack.extractor_path is not None:
                path = Path(attack.extractor_path)
            else:
                key = _key({"data": self.config.data, "attack": _attack_args(self.specs[row])})
                path = self.out / "extractors" / f"{row}.safetensors"

                def is_valid(p: Path) -> bool:
                    return p.is_file() and _safetensors_metadata(p).get("cache_key") == key

                attack.collective = self.collective  # "auto" crafts on the victims' GPU
                self._shared_file(path, is_valid,
                                  lambda p: attack.save_extractor(p, images, labels, {"cache_key": key}))
                attack.extractor, attack.extractor_path = None, str(path)  # craft against the file's weights
            self.extractors[row] = (str(path), file_digest(path))
        return self.extractors[row]

    def _poisons(self, row: str, trial: int, seed: int, images, labels, test_images, test_labels, num_classes) -> PoisonSet:
        """The poisons of ``row`` in ``trial``: loaded, or crafted (once; cached), then checked to be scorable."""
        if self.config.poison is not None:
            poisons = load_poison_file(self.config, images, labels)
            check_scorable(poisons, num_classes, f"--poison {self.config.poison}")
            return poisons
        attack = self.attacks[row]
        extra = {"extractor_sha256": self.extractors[row][1]} if row in self.extractors else {}
        key = _key({**self._base_key(), "attack": _attack_args(self.specs[row]), "trial_seed": seed, **extra})
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
            attack.collective = self.collective  # "auto" crafts on the victims' GPU
            poisons = attack.craft(images, labels, goal=goal, seed=seed)
            poisons.metadata["cache_key"] = key
            p.parent.mkdir(parents=True, exist_ok=True)
            poisons.save(p)

        self._shared_file(path, is_valid, craft)
        poisons = PoisonSet.load(path, base_images=images, base_labels=labels)  # every rank scores the same file
        check_scorable(poisons, num_classes, f"attack {row!r} (trial {trial}: {path})")
        return poisons

    def _run_cell(self, row, defense, trial, seed, poisons, clean_accuracy) -> dict:
        spec = None if row == CLEAN_ROW else (self.specs.get(row) or {"poison": self.config.poison})
        victim = self.victims.get(row)
        extractor, extra = None, {}
        if victim is not None and victim.transfer:
            extractor, sha256 = self.extractors[row]
            extra = {"extractor_sha256": sha256}
        key = _key({**self._base_key(), "attack": spec, "defense": defense.__dict__, "trial_seed": seed, **extra})
        name = f"{row}/{defense.name}/trial_{trial:04d}.json"
        resumed = self._resumed(name, key)
        self.progress.start(f"trial {trial + 1}/{self.config.trials}: {row} / {defense.name}", resumed is not None)
        if resumed is not None:
            return resumed
        model, data, accuracy = train_victim(self.config, defense, poisons, seed, self.out / "lightning",
                                             victim=victim, extractor=extractor)
        seconds = self.progress.elapsed()  # the defense's data preparation (e.g. purification) and the fit
        self._hold(model)
        self.executed += 1
        record = {"attack": row, "defense": defense.name, "trial": trial, "seed": seed, "key": key, "accuracy": accuracy,
                  "kind": None if poisons is None else poisons.kind, "success": None,
                  "victim_seconds": round(seconds, 2)}
        if poisons is not None:
            record["success"] = attack_success(model, poisons, data.test_set, clean_accuracy, accuracy)
            if poisons.kind == "targeted":
                record["target_label"] = int(poisons.target_labels[0]) if poisons.target_labels is not None else None
                record["adversarial_label"] = int(poisons.adversarial_labels[0])
            record["num_poisons"] = len(poisons)
        if self.rank == 0:
            self.results.save_json(name, record)
        self.progress.done()
        return record

    def _hold(self, model: L.LightningModule) -> None:
        """Keep the victim trainer's collective, unless it spans fewer processes than the one held."""
        collective = Collective.of(model.trainer)
        if collective.world_size >= self.collective.world_size:
            self.collective = collective

    def run(self) -> list[dict]:
        """Run (or resume) every trial; returns all per-trial records."""
        c = self.config
        rows = list(self.attacks) if c.poison is None else [Path(c.poison).stem]
        records = []
        self.progress = VictimProgress(c.trials * (int(c.clean_row) + len(rows)) * len(self.defenses),
                                       enabled=self.rank == 0)
        for trial in range(c.trials):
            seed = trial_seed(c.seed, trial)
            base = instantiate(c.data, L.LightningDataModule, "data")
            base.prepare_data()
            base.setup("fit")
            images, labels = base.train_tensors() if hasattr(base, "train_tensors") else dataset_tensors(base.train_set)
            test_images, test_labels = dataset_tensors(base.test_set)
            goals = (images, labels, test_images, test_labels, base.num_classes)
            for row in rows:  # craft or load (and check) every poison set before any victim of the trial trains
                if row in self.victims and self.victims[row].transfer:
                    self._extractor(row, images, labels)
                self._poisons(row, trial, seed, *goals)
            clean = {NO_DEFENSE: None}
            for defense in self.defenses if c.clean_row else []:
                record = self._run_cell(CLEAN_ROW, defense, trial, seed, None, None)
                clean[defense.name] = record["accuracy"]
                records.append(record)
            for row in rows:
                poisons = self._poisons(row, trial, seed, *goals)  # from the cache (or the given file) again
                if poisons.kind == "indiscriminate" and not c.clean_row:
                    raise ValueError(f"{row} is an indiscriminate poison set: its success is the drop from the "
                                     f"clean row; set clean_row: true")
                for defense in self.defenses:
                    records.append(self._run_cell(row, defense, trial, seed, poisons, clean[NO_DEFENSE]))
        self.collective.barrier("evaluate.results")  # rank 0 has written every result
        return records

    def report(self, records: list[dict]) -> tuple[list[dict], str]:
        """``(summary, markdown)`` of ``records``; global rank 0 writes the tables into ``output_dir``."""
        summary = summarise(records)
        if self.rank == 0:
            return summary, write_tables(summary, self.out)
        return summary, markdown_table(summary)


class VictimProgress:
    """One line per victim on stderr: which of how many, and an ETA from the victims trained so far."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.enabled = total, enabled
        self.seen = self.trained = 0
        self.spent = 0.0
        self._started: Optional[float] = None

    def start(self, what: str, resumed: bool) -> None:
        self.seen += 1
        self._started = None if resumed else time.monotonic()
        if not self.enabled:
            return
        left = self.total - self.seen + (0 if resumed else 1)
        eta = f", ETA {duration(self.spent / self.trained * left)}" if self.trained and not resumed else ""
        state = "resumed from its record" if resumed else "training"
        print(f"[victim {self.seen}/{self.total}] {what}: {state}{eta}", file=sys.stderr, flush=True)

    def elapsed(self) -> float:
        """Seconds since the victim being trained started."""
        return time.monotonic() - self._started

    def done(self) -> None:
        if self._started is not None:
            self.spent += self.elapsed()
            self.trained += 1


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


def evaluate(config: EvaluationConfig) -> tuple[list[dict], str]:
    """Run the protocol and write the tables; returns ``(summary, markdown)``.

    Example::

        summary, table = evaluate(EvaluationConfig(data={...}, attacks=[...], defenses=[...], trials=3))
    """
    evaluation = Evaluation(config)
    return evaluation.report(evaluation.run())

"""The evaluation config: the datamodule, the attacks (each with its victim and optional fixed goal), the
defenses, the victim's model and trainer, and the number of trials."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from lightning_defense.attacks.base import Attack, AttackGoal
from lightning_defense.core.device import check_device
from lightning_defense.datamodules.poison import KINDS, NORMS

NO_DEFENSE = "none"
CLEAN_ROW = "clean"


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
    """Everything :func:`~lightning_defense.evaluate.evaluate` needs; see ``configs/digits/evaluate.yaml``.

    ``device`` is where attacks craft (surrogates, extractors, poisons) unless an attack's ``init_args``
    name their own ``device``: ``"auto"`` (the default) is the victims' GPU, or the CPU when the victim's
    trainer has ``accelerator: cpu``; ``"cpu"``, ``"cuda"``, ``"cuda:<i>"`` or ``"mps"`` name one. Victims
    train on their trainer's accelerator.

    ``clean_row`` trains the ``clean`` row: the global ``model`` on clean data, per defense and trial. An
    indiscriminate attack's success is the drop from it, so those attacks need it. Targeted and backdoor
    success never uses it, so a table of only those attacks may set ``clean_row: false`` and save one victim
    per defense and trial (e.g. transfer victims, whose clean reference is not the from-scratch model).
    """

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
    poison_kind: Optional[str] = None
    trust_pickle: bool = False
    progress: bool = True
    device: str = "auto"
    clean_row: bool = True

    def __post_init__(self) -> None:
        check_device(self.device, "device (where attacks craft)")
        if not isinstance(self.clean_row, bool):
            raise ValueError(f"clean_row must be true or false; got {self.clean_row!r}")
        if not isinstance(self.trials, int) or self.trials < 1:
            raise ValueError(f"trials must be an int >= 1; got {self.trials!r}")
        if not isinstance(self.data, dict):
            raise ValueError(f"data must be a class_path/init_args mapping; got {self.data!r}")
        if self.poison is None and not self.attacks:
            raise ValueError("attacks is empty: configure at least one attack, or pass --poison PATH")
        eps = self.poison_eps
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps)
                                or eps <= 0):
            raise ValueError(f"poison_eps must be a finite number > 0 in [0, 1] pixel units (e.g. 0.0313725 for "
                             f"8/255); got {self.poison_eps!r}")
        if self.poison_norm not in NORMS:
            raise ValueError(f"poison_norm must be one of {NORMS}; got {self.poison_norm!r}")
        if self.poison_kind is not None and self.poison_kind not in KINDS:
            raise ValueError(f"poison_kind must be one of {KINDS} (or None: the file's or importer's); "
                             f"got {self.poison_kind!r}")
        names = [d.get("name") if isinstance(d, dict) else None for d in self.defenses]
        if NO_DEFENSE in names or len(set(names)) != len(names):
            raise ValueError(f"defense names must be unique and not {NO_DEFENSE!r} (always run); got {names}")
        attack_names = [a.get("name") if isinstance(a, dict) else None for a in self.attacks]
        if len(set(attack_names)) != len(attack_names) or CLEAN_ROW in attack_names:
            raise ValueError(f"attack names must be unique and not {CLEAN_ROW!r}; got {attack_names}")


def fixed_goal(spec: Any, attack: Attack, what: str) -> Optional[AttackGoal]:
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


def crafting_device(config: EvaluationConfig, spec: dict, victim: Victim) -> Optional[str]:
    """The device setting an attack entry crafts with: None when its ``init_args`` name one (it is kept), else
    ``config.device``, where ``"auto"`` becomes ``"cpu"`` if the attack's victim trainer has ``accelerator: cpu``."""
    if "device" in (spec.get("init_args") or {}):
        return None
    accelerator = {**config.trainer, **victim.trainer}.get("accelerator")
    if config.device == "auto" and accelerator == "cpu":
        return "cpu"
    return config.device

"""Clean-label poisoning attacks used to evaluate the defenses, and their success metric.

Every attack is a class whose constructor takes the threat model (``eps``, ``norm``, ``budget``) and whose
``craft(images, labels, *, goal=None, seed=0)`` returns a :class:`~lightning_defense.datamodules.PoisonSet`.
"""

from lightning_defense.attacks.base import Attack, AttackGoal, apply_trigger, train_surrogate
from lightning_defense.attacks.autoregressive import AutoregressivePerturbation
from lightning_defense.attacks.error_minimizing import ErrorMinimizingNoise
from lightning_defense.attacks.feature_collision import BullseyePolytope, FeatureCollisionNoiseControl, PoisonFrogs
from lightning_defense.attacks.linear_separable import (
    ClasswiseLinearSeparablePerturbation,
    LinearSeparablePerturbation,
    LSPNoiseControl,
)
from lightning_defense.attacks.metrics import AttackSuccessRate
from lightning_defense.attacks.random_noise import (
    BackdoorNoiseControl,
    RandomNoiseControl,
    TargetedNoiseControl,
    UniversalRandomPerturbation,
)
from lightning_defense.attacks.sleeper_agent import SleeperAgent
from lightning_defense.attacks.witches_brew import GradientMatchingAttack, WitchesBrew

__all__ = [
    "Attack",
    "AttackGoal",
    "AttackSuccessRate",
    "AutoregressivePerturbation",
    "BackdoorNoiseControl",
    "BullseyePolytope",
    "FeatureCollisionNoiseControl",
    "ClasswiseLinearSeparablePerturbation",
    "LSPNoiseControl",
    "ErrorMinimizingNoise",
    "GradientMatchingAttack",
    "LinearSeparablePerturbation",
    "PoisonFrogs",
    "RandomNoiseControl",
    "SleeperAgent",
    "TargetedNoiseControl",
    "UniversalRandomPerturbation",
    "WitchesBrew",
    "apply_trigger",
    "train_surrogate",
]

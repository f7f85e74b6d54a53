"""Training-time defenses as Lightning callbacks; each works with any LightningModule.

Every callback here acts on a user's own batches: ``(x, y)`` tuples, dicts or this package's
``(images, labels, indices)`` triples, normalised or not, seen as [0, 1] pixels through
:mod:`lightning_defense.core.pixels`. Each saves what a resumed run needs in its ``state_dict`` and works
under DDP.
"""

from lightning_defense.callbacks.adversarial_training import AdversarialTraining, pgd_attack
from lightning_defense.callbacks.dp_sgd import DPSGD
from lightning_defense.callbacks.friends_noise import FriendsNoise, generate_friendly_noise
from lightning_defense.callbacks.linear_probe import LinearProbe
from lightning_defense.callbacks.pretrained_init import PretrainedInit
from lightning_defense.callbacks.warm_start import WarmStart

__all__ = [
    "AdversarialTraining",
    "DPSGD",
    "FriendsNoise",
    "LinearProbe",
    "PretrainedInit",
    "WarmStart",
    "generate_friendly_noise",
    "pgd_attack",
]

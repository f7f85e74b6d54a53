"""Training-time defenses as Lightning callbacks; each works with any LightningModule.

Every callback here acts on batches ``(images in [0,1], labels, indices)`` (see
:mod:`lightning_defense.core.batch`), saves what a resumed run needs in its ``state_dict``
and works under DDP.
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

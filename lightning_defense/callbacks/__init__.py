"""Training-time defenses as Lightning callbacks; each works with any LightningModule.

Every callback here acts on batches ``(images in [0,1], labels, indices)`` (see
:mod:`lightning_defense.datamodules._base`), saves what a resumed run needs in its ``state_dict``
and works under DDP.
"""

from lightning_defense.callbacks.adversarial_training import AdversarialTraining, pgd_attack
from lightning_defense.callbacks.dp_sgd import DPSGD

__all__ = ["AdversarialTraining", "DPSGD", "pgd_attack"]

"""AttackSuccessRate: the papers' poisoning metric as a torchmetrics ``Metric``.

* ``targeted`` (Hong et al. Sec. 4; Schwarzschild et al.): the fraction of target images the poisoned
  model assigns the adversarial class. Over trials, this is the share of successful attacks.
* ``backdoor``: the fraction of triggered inputs (source-class test images with the patch) classified as
  the target class; Sleeper Agent is scored this way.
* ``indiscriminate``: these attacks have no target; their success is the *drop* in clean test accuracy,
  ``clean_accuracy - accuracy(poisoned model)``, in [-1, 1] (ECLIPSE reports the accuracy itself).
  ``clean_accuracy`` is the accuracy of a model trained on clean data with the same recipe and seed.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torchmetrics import Metric

KINDS = ("targeted", "backdoor", "indiscriminate")


class AttackSuccessRate(Metric):
    """Success rate of a poisoning attack.

    ``update(preds, labels)`` takes logits ``(N, K)`` or class predictions ``(N,)``. For ``targeted``,
    ``labels`` are the adversarial labels of the targets; for ``backdoor``, the target class of each
    triggered input; for ``indiscriminate``, the true labels of the clean test set.

    Args:
        kind: ``"targeted"``, ``"backdoor"`` or ``"indiscriminate"``.
        clean_accuracy: For ``indiscriminate`` only: the clean model's test accuracy in [0, 1].

    Raises:
        ValueError: On an unknown kind, or ``clean_accuracy`` missing/out of range for ``indiscriminate``.

    Example::

        >>> metric = AttackSuccessRate("targeted")
        >>> metric.update(torch.tensor([3, 1]), torch.tensor([3, 2]))
        >>> metric.compute()
        tensor(0.5000)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, kind: str = "targeted", clean_accuracy: Optional[float] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
        if kind == "indiscriminate":
            if clean_accuracy is None or not 0 <= float(clean_accuracy) <= 1:
                raise ValueError(
                    f"kind='indiscriminate' needs clean_accuracy in [0, 1] (the clean model's test accuracy); "
                    f"got {clean_accuracy!r}"
                )
        elif clean_accuracy is not None:
            raise ValueError(f"clean_accuracy is only used with kind='indiscriminate'; got kind={kind!r}")
        self.kind = kind
        self.clean_accuracy = None if clean_accuracy is None else float(clean_accuracy)
        self.add_state("hits", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, labels: Tensor) -> None:
        if preds.ndim == 2:
            preds = preds.argmax(dim=1)
        if preds.shape != labels.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and labels {tuple(labels.shape)} must describe the same inputs")
        self.hits += (preds == labels).sum()
        self.total += labels.numel()

    def compute(self) -> Tensor:
        if self.total == 0:
            raise RuntimeError("AttackSuccessRate.compute() called before any update()")
        rate = self.hits.float() / self.total
        if self.kind == "indiscriminate":
            return torch.tensor(self.clean_accuracy, dtype=rate.dtype, device=rate.device) - rate
        return rate

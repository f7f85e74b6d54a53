"""The poisoning papers' training recipe, in one place: SGD with Nesterov momentum 0.9, weight decay
5e-4, and x0.1 steps at 3/8, 5/8 and 7/8 of training (FRIENDS; Hong et al.; the attack surrogates)."""

from __future__ import annotations

from typing import Iterable, Optional

import torch


def paper_milestones(total: int) -> list[int]:
    """The step schedule at 3/8, 5/8 and 7/8 of ``total`` epochs (or steps): 30/50/70 for 80 epochs.

    The FRIENDS code writes ``[e//2.667, e//1.6, e//1.142]``, whose float floors give 29/49/70 for 80
    epochs; the fractions it approximates give the 30/50/70 the paper states. Never a step at 0.
    """
    return sorted({max(1, round(total * f)) for f in (3 / 8, 5 / 8, 7 / 8)})


def sgd_with_steps(
    params: Iterable,
    total: int,
    lr: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    milestones: Optional[list[int]] = None,
    gamma: float = 0.1,
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.MultiStepLR]:
    """SGD and its x``gamma`` step schedule over ``total`` scheduler steps (epochs or iterations).

    Nesterov momentum applies only with ``momentum > 0``; ``milestones`` default to :func:`paper_milestones`.
    """
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=bool(nesterov and momentum > 0),
                                weight_decay=weight_decay)
    steps = milestones if milestones is not None else paper_milestones(total)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=steps, gamma=gamma)

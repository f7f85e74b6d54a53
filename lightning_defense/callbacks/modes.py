"""Switching a model to eval mode for a while without undoing the modes other callbacks set.

Training-time defenses run extra forward passes in eval mode (PGD's attack, FRIENDS' Algorithm 1) so that
BatchNorm neither uses nor updates batch statistics. A blanket ``module.train()`` afterwards would undo
modes set on purpose elsewhere: :class:`~lightning_defense.callbacks.LinearProbe` keeps the frozen
extractor, BatchNorm included, in eval mode. :func:`eval_mode` gives every submodule back its own mode.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` and every submodule in eval mode for the block; then restore each one's own mode.

    Example::

        with eval_mode(pl_module):
            adversarial = pgd_attack(pl_module, x, y, eps, steps, step_size)
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training  # per module (not m.train(), which would recurse into its children)

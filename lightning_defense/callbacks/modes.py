"""Switching a model to eval mode for a while without undoing the modes other callbacks set.

Training-time defenses run extra forward passes in eval mode (PGD's attack, FRIENDS' Algorithm 1) so that
BatchNorm neither uses nor updates batch statistics. A blanket ``module.train()`` afterwards would undo
modes set on purpose elsewhere: :class:`~lightning_defense.callbacks.LinearProbe` keeps the frozen
extractor, BatchNorm included, in eval mode. :func:`eval_mode` gives every submodule back its own mode.
:func:`defense_pass` adds what those passes need under DP-SGD: Opacus' per-sample capture paused.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import lightning as L
from torch import nn

from lightning_defense.callbacks.dp_sgd import DPSGD


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


@contextmanager
def defense_pass(trainer: L.Trainer, module: nn.Module) -> Iterator[nn.Module]:
    """A training-time defense's own forward/backward passes: :func:`eval_mode`, with every
    :class:`~lightning_defense.callbacks.DPSGD` callback's per-sample gradient capture paused (Opacus' hooks
    would otherwise see the attack's passes and fail on the next training step).

    Example::

        with defense_pass(trainer, pl_module):
            adversarial = pgd_attack(pl_module, x, y, eps, steps, step_size)
    """
    with ExitStack() as stack:
        for callback in trainer.callbacks:
            if isinstance(callback, DPSGD):
                stack.enter_context(callback.capture_paused())
        yield stack.enter_context(eval_mode(module))

"""In-domain warm-starting (Hong, Carlini & Kurakin, 2024, Sec. 4.2; after Ash & Adams, 2020).

"Certified Robustness to Clean-Label Poisoning Using Diffusion Denoising": train on the tampered data
for a few epochs (10 on CIFAR-10), then continue on the denoised training set (30 more epochs).
"""

from __future__ import annotations

import importlib
from typing import Any, Optional, Union

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info


class WarmStart(Callback):
    """Train the first ``epochs`` epochs on the trainer's (tampered) data, the rest on purified data.

    The purified data come from either

    * ``purified``: any LightningDataModule with a ``train_set`` after ``setup`` (e.g.
      ``GaussianNoiseDataModule(base=...)`` or a diffusion-purified datamodule around the same base), or
    * ``wrapper`` (+ ``wrapper_kwargs``): a ``TrainSplitWrapper`` subclass, or its dotted class path,
      applied to the trainer's own datamodule: ``wrapper(base=trainer.datamodule, **wrapper_kwargs)``.

    The purified datamodule is prepared (``prepare_data`` on local rank 0, then ``setup``) when fit
    starts, so a purification cache is built before training. At the end of epoch ``epochs - 1`` the
    training dataloader is replaced by the purified one (the trainer re-adds its distributed sampler
    under DDP). The switch depends only on the epoch, so every rank takes it together, and a run
    resumed after the switch trains on the purified data from its first batch.

    Args:
        epochs: Epochs on the tampered data before switching (the paper's 10).
        purified: A datamodule holding the purified training set.
        wrapper: Dotted class path (a class also works) of a wrapper that purifies the trainer's datamodule.
        wrapper_kwargs: Keyword arguments for ``wrapper`` besides ``base``.

    Raises:
        ValueError: If ``epochs < 1``, or not exactly one of ``purified`` / ``wrapper`` is given.

    Example::

        warm = WarmStart(epochs=10, wrapper="lightning_defense.datamodules.GaussianNoiseDataModule",
                         wrapper_kwargs={"sigma": 0.25})
        L.Trainer(max_epochs=40, callbacks=[warm]).fit(model, datamodule=tampered)
    """

    def __init__(
        self,
        epochs: int = 10,
        purified: Optional[L.LightningDataModule] = None,
        wrapper: Optional[str] = None,
        wrapper_kwargs: Optional[dict[str, Any]] = None,
    ) -> None:
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(
                f"epochs must be an integer >= 1 (epochs on the tampered data); got {epochs!r}. "
                "To train on purified data only, pass the purified datamodule to fit() instead"
            )
        if (purified is None) == (wrapper is None):
            raise ValueError(
                "give exactly one of purified= (a LightningDataModule with the purified train_set) or "
                f"wrapper= (a TrainSplitWrapper class or dotted path); got purified={purified!r}, wrapper={wrapper!r}"
            )
        if purified is not None and not isinstance(purified, L.LightningDataModule):
            raise TypeError(f"purified must be a LightningDataModule; got {type(purified).__name__}")
        if wrapper_kwargs is not None and wrapper is None:
            raise ValueError("wrapper_kwargs needs wrapper=")
        if wrapper is not None:
            wrapper = _resolve_class(wrapper)
        self.epochs = epochs
        self.purified = purified
        self.wrapper = wrapper
        self.wrapper_kwargs = dict(wrapper_kwargs or {})
        self._purified_dm: Optional[L.LightningDataModule] = purified
        self._switched_at: Optional[int] = None  # epoch from which the purified data are used

    @property
    def state_key(self) -> str:
        name = self.wrapper.__qualname__ if self.wrapper is not None else type(self.purified).__qualname__
        return self._generate_state_key(epochs=self.epochs, purified=name)

    @property
    def purified_datamodule(self) -> Optional[L.LightningDataModule]:
        """The datamodule the purified training batches come from (built in ``setup`` for ``wrapper``)."""
        return self._purified_dm

    def state_dict(self) -> dict[str, Any]:
        return {"switched_at": self._switched_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._switched_at = state_dict.get("switched_at")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.wrapper is not None:
            if trainer.datamodule is None:
                raise RuntimeError("WarmStart(wrapper=...) wraps the trainer's datamodule: call fit(model, datamodule=...)")
            if self._purified_dm is None or getattr(self._purified_dm, "base", None) is not trainer.datamodule:
                self._purified_dm = self.wrapper(base=trainer.datamodule, **self.wrapper_kwargs)
        dm = self._purified_dm
        dm.trainer = trainer
        if trainer.local_rank == 0:
            dm.prepare_data()
        trainer.strategy.barrier("WarmStart.prepare_data")
        dm.setup("fit")
        if getattr(dm, "train_set", None) is None:
            raise AttributeError(f"the purified datamodule {type(dm).__name__} has no train_set after setup('fit')")
        tampered = getattr(trainer.datamodule, "train_set", None) if trainer.datamodule is not None else None
        if tampered is not None and len(tampered) != len(dm.train_set):
            raise ValueError(
                f"the purified training set has {len(dm.train_set)} samples but the tampered one has {len(tampered)}; "
                "the purified datamodule must wrap the same base data"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed run: the trainer built the tampered loader before this hook; replace it now.
        if trainer.current_epoch >= self.epochs or self._switched_at is not None:
            self._switch(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs and self._switched_at is None:
            self._switched_at = trainer.current_epoch + 1
            rank_zero_info(f"WarmStart: training on the purified data from epoch {self._switched_at}")
            self._switch(trainer)

    def _switch(self, trainer: L.Trainer) -> None:
        if self._switched_at is None:
            self._switched_at = trainer.current_epoch
        fit_loop = trainer.fit_loop
        # Lightning 2.x: the fit loop asks its data source for a loader when _combined_loader is None.
        fit_loop._data_source.instance = self._purified_dm.train_dataloader()
        fit_loop._combined_loader = None


def _resolve_class(wrapper: Union[str, type]) -> type:
    if isinstance(wrapper, type):
        cls = wrapper
    elif isinstance(wrapper, str) and "." in wrapper:
        module, _, name = wrapper.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"wrapper {wrapper!r} could not be imported: {err}") from err
    else:
        raise ValueError(f"wrapper must be a class or a dotted class path such as 'pkg.module.Class'; got {wrapper!r}")
    if not (isinstance(cls, type) and issubclass(cls, L.LightningDataModule)):
        raise ValueError(f"wrapper {wrapper!r} is not a LightningDataModule class")
    return cls

"""In-domain warm-starting (Hong, Carlini & Kurakin, 2024, Sec. 4.2; after Ash & Adams, 2020).

"Certified Robustness to Clean-Label Poisoning Using Diffusion Denoising": train on the tampered data
for a few epochs (10 on CIFAR-10), then continue on the denoised training set (30 more epochs).
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset

from lightning_defense.core.collective import Collective
from lightning_defense.core.config import resolve_class
from lightning_defense.core.seam import TrainingDataSeam


class WarmStart(Callback):
    """Train the first ``epochs`` epochs on the trainer's (tampered) data, the rest on purified data.

    The purified data come from either

    * ``purified``: any LightningDataModule with a ``train_set`` after ``setup`` (e.g.
      ``GaussianNoiseDataModule(base=...)`` or a diffusion-purified datamodule around the same base), or
    * ``wrapper`` (+ ``wrapper_kwargs``): a ``TrainSplitWrapper`` subclass, or its dotted class path,
      applied to the trainer's own datamodule: ``wrapper(base=trainer.datamodule, **wrapper_kwargs)``.

    The trainer's datamodule may be a user's own (any batch layout, normalised and augmented in its
    dataset's transform): a wrapper's ``train_set`` is then its rewritten pixels in the user's own form, so the
    user's loader, augmentation, normalisation and ``training_step`` carry on unchanged after the switch.

    The purified datamodule is prepared (``prepare_data`` on local rank 0, then ``setup``) when fit
    starts, so a purification cache is built before training. At the end of epoch ``epochs - 1`` the
    training loader's samples are swapped for the purified ones through the
    :class:`~lightning_defense.core.seam.TrainingDataSeam`: the loader, its (distributed) sampler and its
    shuffling state stay, sample i is read from the purified set. The switch depends only on the epoch,
    so every rank takes it together, and a run resumed after the switch trains on the purified data from
    its first batch. The training loader must not keep persistent workers (they would hold a stale copy).

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
            wrapper = resolve_class(wrapper, L.LightningDataModule, "wrapper")
        self.epochs = epochs
        self.purified = purified
        self.wrapper = wrapper
        self.wrapper_kwargs = dict(wrapper_kwargs or {})
        self._purified_dm: Optional[L.LightningDataModule] = purified
        self._switched_at: Optional[int] = None  # epoch from which the purified data are used
        self._seam: Optional[TrainingDataSeam] = None  # the fit's seam, from setup on
        self._swapped = False

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
        if self._switched_at is not None and self._seam is not None:
            self._switch()  # resumed after the switch: restored after setup, before the training loader exists

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._seam, self._swapped = None, False
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
        Collective.of(trainer).barrier("WarmStart.prepare_data")
        dm.setup("fit")
        if getattr(dm, "train_set", None) is None:
            raise AttributeError(f"the purified datamodule {type(dm).__name__} has no train_set after setup('fit')")
        self._check_length(self._tampered_set(trainer))
        self._seam = TrainingDataSeam.of(trainer)
        self._seam.enable_swapping()
        if self._switched_at is not None:
            self._switch()  # a further fit() after the switch

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch < self.epochs or self._swapped:
            return
        # Resumed past the switch from a checkpoint without WarmStart's state: the loader already exists.
        if getattr(trainer.train_dataloader, "num_workers", 0) > 0:
            raise RuntimeError(
                f"WarmStart: resuming at epoch {trainer.current_epoch}, after the switch, from a checkpoint without "
                "WarmStart's state, but the training loader's workers already read the tampered data; resume from "
                "a checkpoint saved with this WarmStart(epochs=...), or use num_workers=0"
            )
        self._switched_at = trainer.current_epoch
        self._switch()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs and self._switched_at is None:
            self._switched_at = trainer.current_epoch + 1
            rank_zero_info(f"WarmStart: training on the purified data from epoch {self._switched_at}")
            self._switch()

    def _tampered_set(self, trainer: L.Trainer) -> Optional[Dataset]:
        """The trainer's training set, when it can be told before its loader exists: the datamodule's
        ``train_set``, or the one a wrapper of that datamodule read (a user's datamodule with loaders only)."""
        datamodule = trainer.datamodule
        if datamodule is None:
            return None
        tampered = getattr(datamodule, "train_set", None)
        view = getattr(self._purified_dm, "view", None)
        if tampered is None and view is not None and getattr(self._purified_dm, "base", None) is datamodule:
            tampered = view.dataset
        return tampered

    def _check_length(self, tampered: Optional[Dataset]) -> None:
        purified = self._purified_dm.train_set
        if tampered is not None and len(tampered) != len(purified):
            raise ValueError(
                f"the purified training set has {len(purified)} samples but the tampered one has {len(tampered)}; "
                "the purified datamodule must wrap the same base data"
            )

    def _switch(self) -> None:
        self._check_length(self._seam.user_training_set)  # the training loader's own set, once it exists
        self._seam.swap_training_set(self._purified_dm.train_set)
        self._swapped = True

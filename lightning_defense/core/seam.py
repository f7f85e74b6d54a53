"""The one seam for replacing a fit's training data: loader transforms applied where the strategy
processes each loader.

Lightning hands every loader it is about to run to ``Strategy.process_dataloader``, after it has added
its own distributed sampler. :class:`TrainingDataSeam` (one per Trainer) wraps that call once and applies
the transforms registered on it, in priority order:

1. ``DATASET``: swap the samples a loader reads, keeping its sampler (WarmStart's purified data);
2. ``SAMPLER``: replace how batches are drawn (DPSGD's Poisson sampling);
3. ``SHARD``: cut each batch into per-rank shares (``evaluate`` under DDP).

Every defense that changes the training data during a fit goes through it; none touches the fit loop's
internals or the user's datamodule.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_defense.core.pixels import PixelView

DATASET, SAMPLER, SHARD = 0, 10, 20

#: ``transform(loader, is_train) -> loader``
LoaderTransform = Callable[[DataLoader, bool], Any]

_SWAP = "training-set-swap"


class SwappableDataset(Dataset):
    """A dataset whose samples come from ``source`` until :meth:`swap` points it at another set of equal length.

    Swapping keeps the loader, its sampler and its shuffling state: sample i of the new set is read where
    sample i of the old one would have been.
    """

    def __init__(self, source: Dataset) -> None:
        self.source = source

    def swap(self, source: Dataset) -> None:
        if len(source) != len(self.source):
            raise ValueError(f"the new training set has {len(source)} samples but the one it replaces has "
                             f"{len(self.source)}; it must hold the same samples, rewritten")
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        return self.source[index]


def rebuild_loader(loader: DataLoader, *, dataset: Optional[Dataset] = None, batch_sampler: Any = None) -> DataLoader:
    """``loader`` with another dataset or batch sampler and every other setting kept.

    The batch size and ``drop_last`` live on in the batch sampler (``loader.batch_sampler.batch_size``); the
    rebuilt loader's own ``batch_size`` is None, as for any loader given a ``batch_sampler``.

    Raises:
        ValueError: ``loader`` reads an iterable dataset or has no batch sampler (``batch_size=None``).
    """
    if isinstance(loader.dataset, IterableDataset) or loader.batch_sampler is None:
        raise ValueError(f"this defense needs a map-style training set loaded with a batch_size; got a loader over "
                         f"{type(loader.dataset).__name__} with batch_sampler={loader.batch_sampler!r}")
    workers = loader.num_workers
    return DataLoader(
        loader.dataset if dataset is None else dataset,
        batch_sampler=loader.batch_sampler if batch_sampler is None else batch_sampler,
        num_workers=workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator, prefetch_factor=loader.prefetch_factor if workers > 0 else None,
        persistent_workers=loader.persistent_workers, pin_memory_device=loader.pin_memory_device,
        in_order=getattr(loader, "in_order", True),
    )


class TrainingDataSeam:
    """The loader transforms of one Trainer; get it with :meth:`of` (installed on first use).

    ``is_train`` is True for the fit's training loader(s) and False for validation (incl. the sanity
    check), test and predict loaders.

    Example::

        seam = TrainingDataSeam.of(trainer)
        seam.add("my-defense", lambda loader, is_train: loader if not is_train else my_loader(loader), SAMPLER)
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self._transforms: dict[str, tuple[int, LoaderTransform]] = {}
        self._swappable: Optional[SwappableDataset] = None
        self._training_set: Optional[Dataset] = None  # what the training loader reads after a swap
        self._train_loader_built = False
        self.user_training_set: Optional[Dataset] = None  # the training loader's dataset as the user built it
        strategy = trainer.strategy
        process = strategy.process_dataloader
        strategy.process_dataloader = lambda dataloader: self._apply(process(dataloader))

    @classmethod
    def of(cls, trainer: Any) -> "TrainingDataSeam":
        seam = getattr(trainer, "_training_data_seam", None)
        if seam is None or seam.trainer is not trainer:
            seam = cls(trainer)
            trainer._training_data_seam = seam
        return seam

    def training_view(self, normalization: Any = None, image_key: Optional[str] = None,
                      label_key: Optional[str] = None) -> PixelView:
        """The :class:`~lightning_defense.core.pixels.PixelView` of the user's training set (once the training
        loader is built): how a defense finds the images of a batch and maps them to [0, 1] pixels.

        Raises:
            RuntimeError: before the training loader exists, or when it reads no map-style dataset.
        """
        if self.user_training_set is None:
            raise RuntimeError("the training loader is not built yet, or reads no map-style dataset: a defense that "
                               "acts on pixels needs a torch DataLoader over a Dataset with __getitem__ and __len__")
        return PixelView(self.user_training_set, normalization, owner=self.trainer.datamodule,
                         image_key=image_key, label_key=label_key)

    def add(self, name: str, transform: LoaderTransform, priority: int) -> None:
        """Register (or replace) the transform ``name``; it runs on every loader the strategy processes."""
        self._transforms[name] = (priority, transform)

    def enable_swapping(self) -> None:
        """Build the training loader over a :class:`SwappableDataset` (call before the fit's loaders exist,
        e.g. in a callback's ``setup``)."""
        self.add(_SWAP, self._swap_transform, DATASET)

    def swap_training_set(self, dataset: Dataset) -> None:
        """From the next training batch on, read the training samples from ``dataset`` (same length, same order).

        Before the training loader exists the swap is applied when it is built (and again whenever it is
        rebuilt, e.g. on ``reload_dataloaders_every_n_epochs``). Batches already prefetched by running
        DataLoader workers are not re-read: swap between epochs, when the workers restart.

        Raises:
            RuntimeError: The training loader was built before :meth:`enable_swapping`.
            ValueError: ``dataset`` has another length than the training set it replaces.
        """
        if _SWAP not in self._transforms:
            if self._train_loader_built:
                raise RuntimeError("swap_training_set: the training loader was built before enable_swapping(); "
                                   "call enable_swapping() in the callback's setup()")
            self.enable_swapping()
        if self._swappable is not None:
            self._swappable.swap(dataset)
        self._training_set = dataset

    def _swap_transform(self, loader: Any, is_train: bool) -> Any:
        if not is_train:
            return loader
        if not isinstance(loader, DataLoader):
            raise ValueError(f"swapping the training set needs a torch DataLoader as training loader; got "
                             f"{type(loader).__name__}")
        if loader.persistent_workers and loader.num_workers > 0:
            raise ValueError(
                f"swapping the training set needs DataLoader workers that restart every epoch, but the training "
                f"loader has persistent_workers=True with num_workers={loader.num_workers}: the workers would keep "
                "reading their stale copy of the old training set. Build it with persistent_workers=False"
            )
        swappable = SwappableDataset(loader.dataset)
        if self._training_set is not None:
            swappable.swap(self._training_set)
        self._swappable = swappable
        return rebuild_loader(loader, dataset=swappable)

    def _apply(self, loader: Any) -> Any:
        is_train = bool(getattr(self.trainer, "training", False))
        self._train_loader_built |= is_train
        if is_train and isinstance(getattr(loader, "dataset", None), Dataset):
            self.user_training_set = loader.dataset
        for _, transform in sorted(self._transforms.values(), key=lambda item: item[0]):
            loader = transform(loader, is_train)
        return loader

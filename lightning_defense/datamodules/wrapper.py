"""Wrapping a datamodule: rewrite its training split, pass validation and test through.

The wrapped datamodule is either this package's own (an :class:`ImageDataModule`: ``train_set``/``val_set``/
``test_set`` of ``(image, label, index)`` pixel triples) or any user's ``LightningDataModule`` written as the
Lightning docs write one: datasets under names of its own, only ``*_dataloader()`` methods, ``(x, y)`` or dict
items, normalised and augmented in the dataset's transform. A :class:`~lightning_defense.core.pixels.PixelView`
reads the user's training set as [0, 1] pixels for the rewrite, and dresses the rewritten pixels back in the
user's own form (layout, augmentation, normalisation); the user's own loaders then serve them.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler

from lightning_defense.core.batch import dataset_tensors
from lightning_defense.core.collective import Collective
from lightning_defense.core.pixels import Layout, Normalization, PixelSpace, PixelView, pixel_triples
from lightning_defense.core.rng import generator
from lightning_defense.core.seam import rebuild_loader
from lightning_defense.datamodules.base import ImageDataModule

SPLITS = ("train", "val", "test")


def split_dataset(datamodule: L.LightningDataModule, split: str) -> Optional[Dataset]:
    """``datamodule``'s dataset of ``split`` (``"train"``, ``"val"`` or ``"test"``), once it is set up:
    its ``<split>_set`` attribute (this package's convention), else the dataset of its own
    ``<split>_dataloader()``, or None when it has neither.

    Raises:
        ValueError: the loader is not one torch ``DataLoader`` over a map-style dataset.
    """
    dataset = getattr(datamodule, f"{split}_set", None)
    if dataset is not None:
        return dataset
    name = f"{split}_dataloader"
    if not is_overridden(name, datamodule, L.LightningDataModule):
        return None
    loader = getattr(datamodule, name)()
    if isinstance(loader, (list, tuple)) and len(loader) == 1:
        loader = loader[0]
    dataset = getattr(loader, "dataset", None)
    if not isinstance(loader, DataLoader) or isinstance(dataset, IterableDataset):
        raise ValueError(
            f"{type(datamodule).__name__}.{name}() must return one torch DataLoader over a map-style Dataset "
            f"(with __getitem__ and __len__) for a data-rewriting defense to read its samples; got "
            f"{type(loader).__name__}" + (f" over {type(dataset).__name__}" if dataset is not None else ""))
    return dataset


def loader_over(loader: DataLoader, dataset: Dataset) -> DataLoader:
    """``loader`` (a user's) reading ``dataset`` instead, every other setting kept (batch size, shuffling,
    ``collate_fn``, workers). A dataset of another length (a filtered split) gets a fresh sampler of the same
    kind (random or sequential) over it."""
    if len(dataset) == len(loader.dataset):
        return rebuild_loader(loader, dataset=dataset)
    sampler, batches = loader.sampler, loader.batch_sampler
    if type(sampler) is RandomSampler and not sampler.replacement:
        sampler = RandomSampler(dataset, generator=sampler.generator)
    elif type(sampler) is SequentialSampler:
        sampler = SequentialSampler(dataset)
    else:
        sampler = None
    if sampler is None or type(batches) is not BatchSampler:
        raise ValueError(
            f"the rewritten training set has {len(dataset)} samples, the user's {len(loader.dataset)}, and its loader "
            f"draws them with {type(loader.sampler).__name__}/{type(batches).__name__}, which cannot be resized; "
            "load the training set with batch_size= and shuffle= only")
    batch_sampler = BatchSampler(sampler, batches.batch_size, batches.drop_last)
    return rebuild_loader(loader, dataset=dataset, batch_sampler=batch_sampler)


class TrainSplitWrapper(ImageDataModule):
    """Base of every wrapper that rewrites only the training split of ``base``.

    Subclasses implement :meth:`wrap_train`, the fixed rewrite of the training split (sample i stays sample
    i), on a dataset of ``(pixels in [0, 1], label, index)`` triples, returning one; and may add
    :meth:`train_batch_transform`, a fresh random rewrite of every training batch, on [0, 1] pixels. A
    wrapper that can serve as the certification loop's smoothing states the noise it certifies as
    ``certified_sigma``: the std (in [0, 1] pixels) of the Gaussian N(0, sigma^2 I) its training data holds
    on every sample, or None (e.g. ``EclipseDataModule(diffusion=False)``); a wrapper without it (e.g. ISS,
    Deep k-NN) certifies nothing. A wrapper keeps its own arguments under their own names: its ``seed`` (None
    when it takes none) is its own random draw, never ``base``'s.

    ``base`` may be

    * this package's own datamodule (an :class:`ImageDataModule`): the rewrite reads its ``train_set``, the
      wrapper serves ``train_set`` with its own loader (``base``'s batch size, workers and :attr:`loader_seed`)
      and ``base``'s ``val_set``/``test_set``, untouched;
    * any ``LightningDataModule``: the training set is ``base.train_set`` when it has one, else the dataset of
      ``base.train_dataloader()``; :attr:`view` (a :class:`~lightning_defense.core.pixels.PixelView`) reads it
      as pixels and dresses the rewrite in the user's form (item i = the user's item i with its image
      rewritten, then the user's own augmentation and normalisation). ``train_dataloader()`` is ``base``'s
      own training loader over that set, ``val_dataloader()``/``test_dataloader()`` are ``base``'s own (none
      when it has none), and ``base``'s (else the model's) ``on_after_batch_transfer`` still runs. The
      normalisation is read as :class:`~lightning_defense.core.pixels.PixelView` says (a torchvision
      ``Normalize`` in the transform, or ``normalization = (mean, std)`` on the dataset or on ``base``).

    After ``setup``, :attr:`pixel_train_set` holds the rewritten training split as pixel triples (for this
    package's datamodules, ``train_set`` itself). ``num_classes``/``num_channels`` come from ``base`` when it
    has them (``num_channels`` is otherwise read from the pixels in ``setup``).

    Args:
        base: The datamodule whose training split is rewritten.
        normalization: ``(mean, std)`` its training images were normalised with, when neither its dataset's
            transform (a ``Normalize``) nor a ``normalization`` attribute of the dataset or datamodule says so.
    """

    def __init__(self, base: L.LightningDataModule, normalization: Optional[Normalization] = None) -> None:
        if not isinstance(base, L.LightningDataModule):
            raise TypeError(f"base must be a LightningDataModule; got {type(base).__name__}")
        super().__init__(
            batch_size=getattr(base, "batch_size", 128),
            num_workers=getattr(base, "num_workers", 0),
            seed=None,
        )
        self.base = base
        self.num_classes = getattr(base, "num_classes", None)
        self.num_channels = getattr(base, "num_channels", None)
        self.view: Optional[PixelView] = None  # the user's training set as pixels, after setup
        self.pixel_train_set: Optional[Dataset] = None  # the rewritten training split as pixel triples
        self._normalization = normalization
        PixelSpace.of(normalization)  # a malformed pair fails here, not in setup
        self._collective: Collective | None = None
        self._train_batch_calls = (-1, -1, 0)  # (epoch, global step, calls within that step)

    @property
    def native_base(self) -> bool:
        """``base`` is this package's own datamodule (or a wrapper of one): its splits are pixel triples under
        ``train_set``/``val_set``/``test_set``, served by this wrapper's loaders."""
        return isinstance(self.base, ImageDataModule) and getattr(self.base, "native_base", True)

    @property
    def normalization(self) -> Any:
        """``(mean, std)`` of the training images this wrapper serves (the user's, read by :attr:`view`), or
        ``base``'s ``normalization`` attribute, or None (pixels in [0, 1])."""
        if self._normalization is not None:
            return self._normalization
        if self.view is not None and not self.view.space.identity:
            return self.view.space.mean, self.view.space.std
        return getattr(self.base, "normalization", None)

    @normalization.setter
    def normalization(self, value: Any) -> None:
        self._normalization = value

    @property
    def loader_seed(self) -> int:
        """``base``'s shuffling seed: wrapping a datamodule does not change the order of its training batches."""
        return getattr(self.base, "loader_seed", getattr(self.base, "seed", 0))

    def use_collective(self, collective: Collective) -> None:
        """Share offline work with these ranks (e.g. a Fabric's) when no Trainer is attached."""
        self._collective = collective

    def collective(self) -> Collective:
        """The ranks this datamodule shares its offline work with: the attached Trainer's strategy, or
        the one given to :meth:`use_collective`, or this process alone."""
        if self._collective is not None:
            return self._collective
        return Collective.of(getattr(self, "trainer", None))

    def prepare_data(self) -> None:
        self.base.prepare_data()

    def builds_train(self, stage: Optional[str]) -> bool:
        """Whether ``setup(stage)`` builds the rewritten training split (a user's datamodule may hold no
        training data outside ``fit``)."""
        return self.native_base or stage in (None, "fit")

    def setup(self, stage: str | None = None) -> None:
        self.base.setup(stage)
        if self.native_base:
            for name in ("train_set", "val_set", "test_set"):
                if getattr(self.base, name, None) is None:
                    raise AttributeError(
                        f"{type(self.base).__name__} has no {name} after setup(); a wrapped datamodule must expose "
                        "train_set, val_set and test_set datasets yielding (image, label, index)"
                    )
            self.val_set, self.test_set = self.base.val_set, self.base.test_set
        else:
            self.val_set, self.test_set = split_dataset(self.base, "val"), split_dataset(self.base, "test")
        if self.train_set is None and self.builds_train(stage):
            view, triples = self.train_pixels()
            self.view = view
            self.pixel_train_set = self.wrap_train(triples)
            self.train_set = self.dressed(self.pixel_train_set)
            if self.num_channels is None and len(self.pixel_train_set):
                self.num_channels = int(self.pixel_train_set[0][0].shape[0])

    def train_pixels(self) -> tuple[PixelView, Dataset]:
        """``(view, triples)``: the :class:`PixelView` of ``base``'s training set (``base`` set up for ``fit``)
        and its samples as ``(pixels, label, index)`` triples, checked to lie in [0, 1] (for this package's own
        datasets: the view of ``base.train_set`` and ``base.train_set`` itself). Wrapping a wrapper of a user's
        datamodule reads the inner wrapper's rewritten pixels.

        Raises:
            AttributeError: ``base`` has neither a ``train_set`` nor a ``train_dataloader()``.
            ValueError: the pixels cannot be told (naming the fix).
        """
        base = self.base
        if isinstance(base, TrainSplitWrapper) and not base.native_base:
            if base.pixel_train_set is None:
                base.setup("fit")
            return base.view, base.pixel_train_set
        dataset = split_dataset(base, "train")
        if dataset is None:
            raise AttributeError(
                f"{type(base).__name__} has no training data after setup('fit'): {type(self).__name__} reads it from "
                "a train_set attribute or from the dataset of its train_dataloader()")
        view = PixelView(dataset, self._normalization, owner=base)
        return view, pixel_triples(view, type(self).__name__)

    def wrap_train(self, train_set: Dataset) -> Dataset:
        raise NotImplementedError

    def dressed(self, pixels: Dataset) -> Dataset:
        """The rewritten pixel triples ``pixels`` in the form ``base``'s loaders yield (themselves for this
        package's datamodules)."""
        return self.view.dress(pixels)

    def train_tensors(self) -> tuple[Tensor, Tensor]:
        """The rewritten training split as ``(images in [0,1], labels)``, in index order (before the user's
        augmentation and normalisation)."""
        if self.view is None or self.view.native:
            return super().train_tensors()
        return dataset_tensors(self._require("pixel_train_set"))

    # -- loaders: ours for this package's datamodules, the user's own otherwise ------------------------
    def _user_loader(self, split: str) -> Any:
        self.base.trainer = self.trainer
        return getattr(self.base, f"{split}_dataloader")()

    def train_dataloader(self) -> DataLoader:
        if self.native_base:
            return super().train_dataloader()
        return loader_over(self._user_loader("train"), self._require("train_set"))

    def val_dataloader(self) -> Any:
        if self.native_base:
            return super().val_dataloader()
        return self._user_loader("val") if is_overridden("val_dataloader", self.base, L.LightningDataModule) else []

    def test_dataloader(self) -> Any:
        if self.native_base:
            return super().test_dataloader()
        return self._user_loader("test") if is_overridden("test_dataloader", self.base, L.LightningDataModule) else []

    # -- the per-batch rewrite: the same in ``fit`` and in the certification loop's training ----------
    def train_batch_transform(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """A fresh random rewrite of one training batch, on top of :meth:`wrap_train` (default: none).

        ``fit`` applies it to every training batch once it is on the device (before callbacks and the model's
        crop/flip), drawing from :meth:`train_batch_generator`; the certification loop applies it to every
        batch of its models, drawing from one keyed stream per model. Its draws come from ``generator``
        (a CPU generator) alone. A user's batch is mapped to [0, 1] pixels for it and back.

        Args:
            images: (B, C, H, W) training images in [0, 1] pixels, on the training device.
            generator: The CPU generator of the draws.
        """
        return images

    def train_batch_generator(self, epoch: int, step: int, rank: int = 0, call: int = 0) -> torch.Generator:
        """The CPU generator of one ``fit`` batch's :meth:`train_batch_transform`: the :mod:`core.rng
        <lightning_defense.core.rng>` stream keyed by ``(seed, epoch, global step, rank, call within the step)``."""
        return generator(self.seed or 0, epoch, step, rank, call)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """:meth:`train_batch_transform` on training batches only (a wrapper that defines one); then, for a
        user's datamodule, its own (else its model's) ``on_after_batch_transfer``."""
        trainer = getattr(self, "trainer", None)
        if (trainer is not None and trainer.training
                and type(self).train_batch_transform is not TrainSplitWrapper.train_batch_transform):
            epoch, step = trainer.current_epoch, trainer.global_step
            last_epoch, last_step, calls = self._train_batch_calls
            calls = calls + 1 if (epoch, step) == (last_epoch, last_step) else 0
            self._train_batch_calls = (epoch, step, calls)
            draws = self.train_batch_generator(epoch, step, trainer.global_rank, calls)
            if self.native_base:
                images, *rest = batch
                batch = [self.train_batch_transform(images, draws), *rest]
            else:
                batch = self._transform_user_batch(batch, draws)
        if self.native_base:
            return batch
        if is_overridden("on_after_batch_transfer", self.base, L.LightningDataModule):
            self.base.trainer = trainer
            return self.base.on_after_batch_transfer(batch, dataloader_idx)
        model = getattr(trainer, "lightning_module", None) if trainer is not None else None
        if model is not None and is_overridden("on_after_batch_transfer", model, L.LightningModule):
            return model.on_after_batch_transfer(batch, dataloader_idx)
        return batch

    def _transform_user_batch(self, batch: Any, draws: torch.Generator) -> Any:
        """:meth:`train_batch_transform` on a user's batch: its images found by layout, mapped to [0, 1] pixels
        by the view's pixel space (checked, never clamped) and back."""
        layout, space = self.view.layout, self.view.space
        keys = {f"{what}_key": key for what, key in (("image", layout.image), ("label", layout.label))
                if isinstance(key, str)}
        layout = Layout.detect(batch, **keys)
        pixels = space.to_pixels(layout.split(batch)[0])
        space.check(pixels, type(self).__name__)
        return layout.with_image(batch, space.from_pixels(self.train_batch_transform(pixels, draws)))

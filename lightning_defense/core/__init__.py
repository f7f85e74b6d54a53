"""The bottom layer: what every package of lightning_defense imports, and which imports none of them.

* :mod:`~lightning_defense.core.batch`: the batch contract ``(images in [0, 1], labels, indices)``.
* :mod:`~lightning_defense.core.store`: fingerprints, atomic writes, verified chunk caches and records.
* :mod:`~lightning_defense.core.collective`: rank, barrier, broadcast, gather over a Strategy or Fabric.
* :mod:`~lightning_defense.core.device`: the one device choice (and bf16 autocast) of work outside a Trainer.
* :mod:`~lightning_defense.core.rng`: keyed random streams (per sample, per model).
* :mod:`~lightning_defense.core.recipe`: the papers' SGD recipe.
* :mod:`~lightning_defense.core.config`: config class paths, resolved and type-checked before any call.
* :mod:`~lightning_defense.core.pixels`: a user's batches and datasets seen as [0, 1] pixels, and back.
* :mod:`~lightning_defense.core.seam`: the one place where the training loader is replaced during a fit.
* :mod:`~lightning_defense.core.host_memory`: glibc's allocator kept from faulting a CPU step's tensors in again.
"""

from lightning_defense.core.batch import IndexedDataset, dataset_tensors, to_float_image, unpack_batch
from lightning_defense.core.collective import Collective
from lightning_defense.core.config import instantiate, resolve_class
from lightning_defense.core.device import autocast, record_devices, resolve_device
from lightning_defense.core.host_memory import reuse_freed_memory
from lightning_defense.core.pixels import Layout, PixelSpace, PixelView
from lightning_defense.core.recipe import paper_milestones, sgd_with_steps
from lightning_defense.core.rng import generator, per_sample_normal, per_sample_uniform, seed_for
from lightning_defense.core.seam import TrainingDataSeam
from lightning_defense.core.store import (
    CachedImageDataset,
    ChunkCache,
    CorruptStoreError,
    RecordStore,
    atomic_write,
    fill_cache,
    fingerprint,
)

__all__ = [
    "CachedImageDataset",
    "ChunkCache",
    "Collective",
    "CorruptStoreError",
    "IndexedDataset",
    "Layout",
    "PixelSpace",
    "PixelView",
    "RecordStore",
    "TrainingDataSeam",
    "atomic_write",
    "autocast",
    "dataset_tensors",
    "fill_cache",
    "fingerprint",
    "generator",
    "instantiate",
    "paper_milestones",
    "per_sample_normal",
    "per_sample_uniform",
    "record_devices",
    "resolve_class",
    "resolve_device",
    "reuse_freed_memory",
    "seed_for",
    "sgd_with_steps",
    "to_float_image",
    "unpack_batch",
]

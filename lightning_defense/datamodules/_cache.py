"""Offline per-sample work, cached: atomic ``.npy`` chunks, a manifest written last, resume, DDP sharding.

A purifying wrapper computes one output array per training sample (a purified image) once and reuses
it. :class:`ChunkCache` is the directory for one cache key; :func:`fill_cache` computes its missing
chunks, sharded across ranks when ``torch.distributed`` is initialised (global rank 0 writes every
chunk, the others send theirs to it, and all meet at a barrier); :class:`CachedImages` memory-maps the
result.

The key must cover everything that determines the output (data content, model weights, noise level,
seed, code version): :func:`fingerprint` hashes tensors and plain values into it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

MANIFEST = "manifest.json"
STORAGE_DTYPES = {"uint8": np.uint8, "float16": np.float16}
# What a ChunkCache can hold: the image storage formats, and int8 (FRIENDS' friendly noise in units of zeta/127).
CHUNK_DTYPES = {**STORAGE_DTYPES, "int8": np.int8}


def fingerprint(*parts: Any) -> str:
    """SHA-256 over tensors (shape, dtype, bytes), arrays and JSON-able values, in order."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Tensor):
            part = part.detach().cpu().contiguous()
            digest.update(f"tensor:{tuple(part.shape)}:{part.dtype}".encode())
            digest.update(part.view(torch.uint8).numpy().tobytes() if part.numel() else b"")
        elif isinstance(part, np.ndarray):
            digest.update(f"array:{part.shape}:{part.dtype}".encode())
            digest.update(np.ascontiguousarray(part).tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"|")
    return digest.hexdigest()


def to_storage(images: Tensor, storage: str) -> np.ndarray:
    """[0, 1] float images -> the compact stored form (``uint8`` rounds to 1/255; ``float16``)."""
    if storage == "uint8":
        return images.clamp(0, 1).mul(255.0).round().to(torch.uint8).cpu().numpy()
    if storage == "float16":
        return images.to(torch.float16).cpu().numpy()
    raise ValueError(f"storage must be one of {sorted(STORAGE_DTYPES)}; got {storage!r}")


class ChunkCache:
    """One cache directory: ``chunk_00000.npy``... holding samples ``[i*chunk_size, (i+1)*chunk_size)``.

    Args:
        directory: The directory of this key (created on the first write).
        num_samples: Samples in the whole array.
        sample_shape: Shape of one sample's output.
        storage: ``uint8`` or ``float16`` (images), or ``int8``.
        chunk_size: Samples per chunk file.
        meta: What the key was made from; written into the manifest for people to read.
    """

    def __init__(
        self,
        directory: str | Path,
        num_samples: int,
        sample_shape: tuple[int, ...],
        storage: str = "uint8",
        chunk_size: int = 4096,
        meta: Optional[dict] = None,
    ) -> None:
        if storage not in CHUNK_DTYPES:
            raise ValueError(f"storage must be one of {sorted(CHUNK_DTYPES)}; got {storage!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
        self.directory = Path(directory)
        self.num_samples = int(num_samples)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.storage = storage
        self.chunk_size = int(chunk_size)
        self.meta = dict(meta or {})
        self.ranges = [(s, min(s + self.chunk_size, self.num_samples)) for s in range(0, self.num_samples, self.chunk_size)]

    def chunk_path(self, chunk: int) -> Path:
        return self.directory / f"chunk_{chunk:05d}.npy"

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def is_complete(self) -> bool:
        return self.manifest_path.is_file()

    def missing(self) -> list[int]:
        """Chunks not yet on disk (a chunk file exists only once it is complete)."""
        return [i for i in range(len(self.ranges)) if not self.chunk_path(i).is_file()]

    def write_chunk(self, chunk: int, array: np.ndarray) -> None:
        """Write one chunk atomically: a temporary file, then ``os.replace``."""
        start, stop = self.ranges[chunk]
        expected = (stop - start, *self.sample_shape)
        if array.shape != expected or array.dtype != CHUNK_DTYPES[self.storage]:
            raise ValueError(f"chunk {chunk} must be {expected} {self.storage}; got {array.shape} {array.dtype}")
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.chunk_path(chunk)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)

    def write_manifest(self) -> None:
        """Write the manifest last, once every chunk is there."""
        missing = self.missing()
        if missing:
            raise RuntimeError(f"cannot finish {self.directory}: chunks {missing} are missing")
        manifest = {
            "num_samples": self.num_samples,
            "sample_shape": list(self.sample_shape),
            "storage": self.storage,
            "chunk_size": self.chunk_size,
            "chunks": [self.chunk_path(i).name for i in range(len(self.ranges))],
            "meta": self.meta,
        }
        tmp = self.manifest_path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str))
        os.replace(tmp, self.manifest_path)

    def load(self) -> "CachedImages":
        """Memory-map the finished cache.

        Raises:
            FileNotFoundError: the manifest (or a chunk) is absent: the cache was never finished.
        """
        if not self.is_complete():
            raise FileNotFoundError(
                f"cache {self.directory} has no {MANIFEST}: it was not finished (key {self.directory.name}); "
                "run prepare_data() / setup() or `lightning-defense purify` first"
            )
        manifest = json.loads(self.manifest_path.read_text())
        if manifest["num_samples"] != self.num_samples or tuple(manifest["sample_shape"]) != self.sample_shape:
            raise ValueError(
                f"cache {self.directory} holds {manifest['num_samples']} x {manifest['sample_shape']}; "
                f"expected {self.num_samples} x {list(self.sample_shape)}"
            )
        arrays = []
        for i, (start, stop) in enumerate(self.ranges):
            path = self.chunk_path(i)
            if not path.is_file():
                raise FileNotFoundError(f"cache {self.directory} lists {path.name} but it is missing")
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            if array.shape != (stop - start, *self.sample_shape):
                raise ValueError(f"{path} is shaped {array.shape}; expected {(stop - start, *self.sample_shape)}")
            arrays.append(array)
        return CachedImages(arrays, self.chunk_size)


def fill_cache(
    cache: ChunkCache, compute: Callable[[int, int], np.ndarray], desc: str = "purifying", progress: bool = True
) -> None:
    """Compute the cache's missing chunks with ``compute(start, stop)``, then write the manifest.

    Run by every rank of a distributed job (or by a single process): rank r computes every
    ``world_size``-th missing chunk; global rank 0 receives and writes them all, then the manifest; a
    barrier ends the call. A chunk's content does not depend on which rank computed it, so 1 and N
    processes give identical bytes. An interrupted run resumes from the chunks already written.
    """
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    todo = [] if cache.is_complete() else cache.missing()
    if distributed:  # every rank follows rank 0's view of the disk
        box = [todo]
        dist.broadcast_object_list(box, src=0)
        todo = box[0]
    bar = None
    if progress and rank == 0 and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(cache.ranges[i][1] - cache.ranges[i][0] for i in todo), desc=desc, unit="img")
    for first in range(0, len(todo), world):
        mine = todo[first + rank] if first + rank < len(todo) else None
        result = None if mine is None else (mine, compute(*cache.ranges[mine]))
        results = [result]
        if distributed:
            results = [None] * world if rank == 0 else None
            dist.gather_object(result, results, dst=0)
        if rank == 0:
            for item in results:
                if item is not None:
                    cache.write_chunk(*item)
                    if bar is not None:
                        bar.update(len(item[1]))
    if bar is not None:
        bar.close()
    if rank == 0 and not cache.is_complete():
        cache.write_manifest()
    if distributed:
        dist.barrier()


class CachedImages:
    """Memory-mapped stored images, indexed as one array; items come back as float tensors in [0, 1]."""

    def __init__(self, chunks: list[np.ndarray], chunk_size: int) -> None:
        self.chunks = chunks
        self.chunk_size = chunk_size
        self._len = sum(len(c) for c in chunks)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Tensor:
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} cached samples")
        array = np.array(self.chunks[index // self.chunk_size][index % self.chunk_size])
        if array.dtype == np.uint8:
            return torch.from_numpy(array).float().div_(255.0)
        return torch.from_numpy(array).float()

    def to_tensor(self) -> Tensor:
        """All samples as one float tensor in [0, 1] (reads everything into memory)."""
        return torch.cat([torch.from_numpy(np.array(c)) for c in self.chunks]).float().div_(
            255.0 if self.chunks and self.chunks[0].dtype == np.uint8 else 1.0
        )


class CachedImageDataset(Dataset):
    """``(image, label, index)`` items from :class:`CachedImages` and the split's labels."""

    def __init__(self, images: CachedImages, labels: Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"cached images and labels differ in length: {len(images)} vs {len(labels)}")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index], index

    def tensors(self) -> tuple[Tensor, Tensor]:
        return self.images.to_tensor(), self.labels

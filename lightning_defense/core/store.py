"""The one store: content fingerprints, atomic writes, chunked caches and keyed records, all verified.

* :func:`fingerprint` hashes tensors, arrays and plain values into cache keys.
* :func:`atomic_write` writes a file under a unique temporary name, fsyncs it and moves it into place,
  so a reader never sees a partial file and two writers never share a temporary file.
* :class:`ChunkCache` holds per-sample work (purified images, friendly noise) as ``.npy`` chunks, each
  with a SHA-256 written beside it and listed in a manifest that is written last;
  :func:`fill_cache` computes the missing (or damaged) chunks, shared out over the ranks of a
  :class:`~lightning_defense.core.collective.Collective` (global rank 0 writes), and resumes after a
  kill; :meth:`ChunkCache.load` verifies every chunk against its digest before it is used. A lock file
  per cache directory (:func:`exclusive_lock`) makes a second job on the same cache wait for the first
  and then find its finished chunks, instead of computing them all again.
* :class:`RecordStore` holds keyed records (a certification model's votes, an evaluation trial's result),
  each file with its digest, under a ``key.json`` that names the configuration.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset

from lightning_defense.core.collective import Collective

try:
    import fcntl
except ImportError:  # not POSIX (Windows): caches are not locked against other processes
    fcntl = None

MANIFEST = "manifest.json"
LOCK = ".lock"
DIGEST_SUFFIX = ".sha256"
STORAGE_DTYPES = {"uint8": np.uint8, "float16": np.float16}
# What a ChunkCache can hold: the image storage formats, and int8 (FRIENDS' friendly noise in units of zeta/127).
CHUNK_DTYPES = {**STORAGE_DTYPES, "int8": np.int8}


class CorruptStoreError(ValueError):
    """A stored file is truncated, unreadable, or does not match the digest written with it."""


def fingerprint(*parts: Any) -> str:
    """SHA-256 over tensors (shape, dtype, bytes), arrays and JSON-able values, in order.

    A ``state_dict`` (a mapping of names to tensors) hashes its entries in name order.
    """
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Tensor):
            part = part.detach().cpu().contiguous()
            digest.update(f"tensor:{tuple(part.shape)}:{part.dtype}".encode())
            digest.update(part.reshape(-1).view(torch.uint8).numpy().tobytes() if part.numel() else b"")
        elif isinstance(part, np.ndarray):
            digest.update(f"array:{part.shape}:{part.dtype}".encode())
            digest.update(np.ascontiguousarray(part).tobytes())
        elif isinstance(part, dict) and part and all(isinstance(v, Tensor) for v in part.values()):
            digest.update(fingerprint(*[x for name in sorted(part) for x in (name, part[name])]).encode())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"|")
    return digest.hexdigest()


def file_digest(path: Union[str, Path]) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Union[str, Path], data: Union[bytes, str, Callable[[Any], None]]) -> Path:
    """Write ``path`` atomically: a unique temporary file in the same directory, fsync, ``os.replace``.

    ``data`` is bytes, text, or a function that writes into the open binary handle.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


@contextmanager
def exclusive_lock(path: Union[str, Path], what: str = "") -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if needed) for the block; other processes wait.

    The lock file is removed on release; a waiter that then holds the lock of a removed file takes the
    lock again on the new one, so two processes never both hold it. The kernel releases the lock of a
    killed process (a left-over file is harmless). On a filesystem without ``flock`` support the block
    runs unlocked, with a warning; on a system without ``fcntl`` (Windows) it runs unlocked.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, what) if fcntl is not None else None
    try:
        yield
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)  # while still held, so that a waiter on this file sees it is gone
            os.close(fd)


def _acquire(path: Path, what: str) -> Optional[int]:
    """A descriptor of ``path`` holding its exclusive lock (None where the filesystem has no locks)."""
    waited = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited:
                    rank_zero_info(f"waiting for the other process that holds {path} ({what or 'the same cache'})")
                    waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False  # the holder removed the file on release
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            rank_zero_warn(f"{path.parent} does not support file locks ({err}); running unlocked, so a second job "
                           "on the same cache would compute its chunks again")
            return None
        except BaseException:
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)  # locked a file that is gone: lock the new one


def canonical(obj: Any) -> Any:
    """``obj`` as plain JSON values (unknown objects by ``repr``), for keys and comparison."""
    return json.loads(json.dumps(obj, sort_keys=True, default=repr))


def to_storage(images: Tensor, storage: str) -> np.ndarray:
    """[0, 1] float images -> the compact stored form (``uint8`` rounds to 1/255; ``float16``)."""
    if storage == "uint8":
        return images.clamp(0, 1).mul(255.0).round().to(torch.uint8).cpu().numpy()
    if storage == "float16":
        return images.to(torch.float16).cpu().numpy()
    raise ValueError(f"storage must be one of {sorted(STORAGE_DTYPES)}; got {storage!r}")


def _save_npy(path: Path, array: np.ndarray) -> str:
    """Write ``array`` atomically, then its digest beside it; return the digest."""
    atomic_write(path, lambda handle: np.save(handle, array, allow_pickle=False))
    digest = file_digest(path)
    atomic_write(path.with_name(path.name + DIGEST_SUFFIX), digest)
    return digest


def _verified_digest(path: Path) -> Optional[str]:
    """The digest written beside ``path`` when the file matches it; None when either is missing."""
    side = path.with_name(path.name + DIGEST_SUFFIX)
    if not path.is_file() or not side.is_file():
        return None
    expected = side.read_text().strip()
    if file_digest(path) != expected:
        raise CorruptStoreError(f"{path} does not match its SHA-256 ({side.name}): the file is damaged")
    return expected


def _load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise CorruptStoreError(f"{path} cannot be read as a .npy array ({err}): it is truncated or damaged") from err


class ChunkCache:
    """One cache directory: ``chunk_00000.npy``... holding samples ``[i*chunk_size, (i+1)*chunk_size)``.

    Each chunk has its SHA-256 beside it (``chunk_00000.npy.sha256``); the manifest, written last,
    lists every chunk's digest. :meth:`load` verifies each chunk against the manifest.

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
    def lock_path(self) -> Path:
        return self.directory / LOCK

    def lock(self):
        """An exclusive lock on this cache directory against other processes (:func:`exclusive_lock`)."""
        return exclusive_lock(self.lock_path, f"computing {self.directory.name}")

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def is_complete(self) -> bool:
        return self.manifest_path.is_file()

    def missing(self) -> list[int]:
        """Chunks not yet on disk with their digest (a chunk counts only once both are written)."""
        return [i for i in range(len(self.ranges))
                if not (self.chunk_path(i).is_file() and self._digest_path(i).is_file())]

    def damaged(self) -> list[int]:
        """Chunks on disk whose bytes do not match their digest (reads every chunk)."""
        listed = None
        if self.is_complete():
            try:
                listed = json.loads(self.manifest_path.read_text()).get("sha256")
            except (ValueError, OSError):
                listed = None
            if not isinstance(listed, list) or len(listed) != len(self.ranges):
                return list(range(len(self.ranges)))  # an unreadable manifest: nothing in it can be trusted
        bad = []
        for i in range(len(self.ranges)):
            try:
                digest = _verified_digest(self.chunk_path(i))
            except CorruptStoreError:
                bad.append(i)
                continue
            if listed is not None and digest != listed[i]:
                bad.append(i)
        return bad

    def discard(self, chunks: list[int]) -> None:
        """Remove damaged chunks (and the manifest) so that :func:`fill_cache` computes them again."""
        for i in chunks:
            for path in (self.chunk_path(i), self._digest_path(i)):
                path.unlink(missing_ok=True)
        if chunks:
            self.manifest_path.unlink(missing_ok=True)

    def _digest_path(self, chunk: int) -> Path:
        path = self.chunk_path(chunk)
        return path.with_name(path.name + DIGEST_SUFFIX)

    def write_chunk(self, chunk: int, array: np.ndarray) -> None:
        """Write one chunk atomically (a unique temporary file, then ``os.replace``), then its digest."""
        start, stop = self.ranges[chunk]
        expected = (stop - start, *self.sample_shape)
        if array.shape != expected or array.dtype != CHUNK_DTYPES[self.storage]:
            raise ValueError(f"chunk {chunk} must be {expected} {self.storage}; got {array.shape} {array.dtype}")
        _save_npy(self.chunk_path(chunk), array)

    def write_manifest(self) -> None:
        """Write the manifest last, once every chunk is there, with every chunk's verified digest."""
        missing = self.missing()
        if missing:
            raise RuntimeError(f"cannot finish {self.directory}: chunks {missing} are missing")
        manifest = {
            "num_samples": self.num_samples,
            "sample_shape": list(self.sample_shape),
            "storage": self.storage,
            "chunk_size": self.chunk_size,
            "chunks": [self.chunk_path(i).name for i in range(len(self.ranges))],
            "sha256": [_verified_digest(self.chunk_path(i)) for i in range(len(self.ranges))],
            "meta": self.meta,
        }
        atomic_write(self.manifest_path, json.dumps(manifest, indent=1, sort_keys=True, default=str))

    def load(self) -> "CachedImages":
        """Memory-map the finished cache after checking every chunk against the manifest's digest.

        Raises:
            FileNotFoundError: the manifest (or a chunk) is absent: the cache was never finished.
            CorruptStoreError: a chunk is truncated, damaged or swapped, or the manifest is unreadable.
        """
        if not self.is_complete():
            raise FileNotFoundError(
                f"cache {self.directory} has no {MANIFEST}: it was not finished (key {self.directory.name}); "
                "run prepare_data() / setup() or `lightning-defense purify` first"
            )
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (ValueError, OSError) as err:
            raise CorruptStoreError(f"{self.manifest_path} cannot be read ({err})") from err
        if manifest.get("num_samples") != self.num_samples or tuple(manifest.get("sample_shape", ())) != self.sample_shape:
            raise ValueError(
                f"cache {self.directory} holds {manifest.get('num_samples')} x {manifest.get('sample_shape')}; "
                f"expected {self.num_samples} x {list(self.sample_shape)}"
            )
        digests = manifest.get("sha256")
        if not isinstance(digests, list) or len(digests) != len(self.ranges):
            raise CorruptStoreError(f"{self.manifest_path} lists no digest for each of its {len(self.ranges)} chunks")
        arrays = []
        for i, (start, stop) in enumerate(self.ranges):
            path = self.chunk_path(i)
            if not path.is_file():
                raise FileNotFoundError(f"cache {self.directory} lists {path.name} but it is missing")
            if file_digest(path) != digests[i]:
                raise CorruptStoreError(f"{path} does not match the SHA-256 in {self.manifest_path}: the chunk is "
                                        "damaged, truncated or swapped; delete it and run again to recompute it")
            array = _load_npy(path, mmap=True)
            if array.shape != (stop - start, *self.sample_shape):
                raise CorruptStoreError(f"{path} is shaped {array.shape}; expected {(stop - start, *self.sample_shape)}")
            arrays.append(array)
        return CachedImages(arrays, self.chunk_size)


def fill_cache(
    cache: ChunkCache,
    compute: Callable[[int, int], np.ndarray],
    desc: str = "purifying",
    progress: bool = True,
    collective: Optional[Collective] = None,
) -> None:
    """Compute the cache's missing or damaged chunks with ``compute(start, stop)``, then write the manifest.

    Run by every rank of a distributed job (or by a single process): rank r computes every
    ``world_size``-th chunk to do; global rank 0 receives and writes them all, then the manifest; a
    barrier ends the call. A chunk's content does not depend on which rank computed it, so 1 and N
    processes give identical bytes. An interrupted run resumes from the chunks already written; a chunk
    that does not match its digest is reported by name and computed again, never used.

    Global rank 0 holds the cache's lock (:meth:`ChunkCache.lock`) from its look at the disk to the
    manifest: another job filling the same cache waits for it and then finds the finished, verified
    chunks, so each chunk is computed once. (Under DDP the other ranks wait at the broadcast meanwhile,
    within the process group's timeout.)
    """
    collective = collective or Collective()
    rank, world = collective.rank, collective.world_size
    with cache.lock() if rank == 0 else nullcontext():
        todo = None
        if rank == 0:
            damaged = cache.damaged()
            if damaged:
                rank_zero_warn(f"{cache.directory}: chunks {[cache.chunk_path(i).name for i in damaged]} do not "
                               "match their SHA-256; computing them again")
                cache.discard(damaged)
            todo = [] if cache.is_complete() else cache.missing()
        todo = collective.broadcast(todo, src=0)  # every rank follows rank 0's view of the disk
        bar = None
        if progress and rank == 0 and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(cache.ranges[i][1] - cache.ranges[i][0] for i in todo), desc=desc, unit="img")
        for first in range(0, len(todo), world):
            mine = todo[first + rank] if first + rank < len(todo) else None
            results = collective.gather(None if mine is None else (mine, compute(*cache.ranges[mine])))
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
    collective.barrier("fill_cache")


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

    def raw(self) -> np.ndarray:
        """All samples in their stored dtype, read into memory."""
        return np.concatenate([np.asarray(c) for c in self.chunks])

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


class RecordStore:
    """Keyed records on disk: ``key.json`` names the configuration, each record is a file with its digest.

    A record counts as present once its file and digest are both written; a record whose bytes do not
    match its digest is reported by file name (:class:`CorruptStoreError`), never used.

    Args:
        directory: Where the records live.
        key: Everything that determines the records (JSON-serialisable; see :func:`canonical`).

    Raises:
        ValueError: If ``directory`` already holds records of a different key.
    """

    KEY_FILE = "key.json"

    def __init__(self, directory: Union[str, os.PathLike], key: dict) -> None:
        self.directory = Path(directory)
        self.key = canonical(key)
        self.directory.mkdir(parents=True, exist_ok=True)
        key_path = self.directory / self.KEY_FILE
        if key_path.exists():
            try:
                stored = json.loads(key_path.read_text())
            except ValueError as err:
                raise CorruptStoreError(f"{key_path} cannot be read ({err}); delete the directory to start over") from err
            if stored != self.key:
                changed = sorted(k for k in set(stored) | set(self.key) if stored.get(k) != self.key.get(k))
                raise ValueError(
                    f"{self.directory} holds records of a different configuration (differs in: {', '.join(changed)}); "
                    "choose another output directory, or delete that directory to start over"
                )
        else:
            atomic_write(key_path, json.dumps(self.key, sort_keys=True, indent=2))

    def path(self, name: str) -> Path:
        return self.directory / name

    def has(self, name: str) -> bool:
        path = self.path(name)
        return path.is_file() and path.with_name(path.name + DIGEST_SUFFIX).is_file()

    def save_array(self, name: str, array: np.ndarray) -> None:
        _save_npy(self.path(name), np.asarray(array))

    def load_array(self, name: str) -> np.ndarray:
        path = self.path(name)
        if _verified_digest(path) is None:
            raise FileNotFoundError(f"record {path} (or its {DIGEST_SUFFIX}) is missing")
        return _load_npy(path)

    def save_json(self, name: str, record: Any) -> None:
        path = self.path(name)
        atomic_write(path, json.dumps(canonical(record), indent=1, sort_keys=True))
        atomic_write(path.with_name(path.name + DIGEST_SUFFIX), file_digest(path))

    def load_json(self, name: str) -> Any:
        path = self.path(name)
        if _verified_digest(path) is None:
            raise FileNotFoundError(f"record {path} (or its {DIGEST_SUFFIX}) is missing")
        try:
            return json.loads(path.read_text())
        except ValueError as err:
            raise CorruptStoreError(f"{path} is not valid JSON ({err})") from err

    def discard(self, name: str) -> None:
        path = self.path(name)
        for p in (path, path.with_name(path.name + DIGEST_SUFFIX)):
            p.unlink(missing_ok=True)

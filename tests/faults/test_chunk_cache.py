"""Issue #15.2: direct probes of :class:`ChunkCache` / :func:`fill_cache` with damaged, missing or swapped files.

Nothing damaged is used: :meth:`ChunkCache.load` refuses it naming the file, and :func:`fill_cache`
computes exactly the chunks that cannot be trusted again (counted through a tiny numpy ``compute``).
"""

import os
import re

import numpy as np
import pytest

from lightning_defense.core.store import ChunkCache, CorruptStoreError, fill_cache

NUM_SAMPLES, CHUNK = 10, 3  # chunks [0, 3), [3, 6), [6, 9), [9, 10)


def _expected() -> np.ndarray:
    return (np.arange(2 * NUM_SAMPLES) * 7 % 256).astype(np.uint8).reshape(NUM_SAMPLES, 2)


def _cache(tmp_path) -> ChunkCache:
    return ChunkCache(tmp_path / "cache", NUM_SAMPLES, (2,), "uint8", chunk_size=CHUNK, meta={"probe": 1})


class Counting:
    """``compute(start, stop)`` that records its calls; raises KeyboardInterrupt (a kill) at call ``kill_at``."""

    def __init__(self, kill_at=None):
        self.calls, self.kill_at = [], kill_at

    def __call__(self, start: int, stop: int) -> np.ndarray:
        if self.kill_at is not None and len(self.calls) == self.kill_at:
            raise KeyboardInterrupt
        self.calls.append(start)
        return _expected()[start:stop]


def _filled(tmp_path) -> ChunkCache:
    cache = _cache(tmp_path)
    compute = Counting()
    fill_cache(cache, compute, progress=False)
    assert compute.calls == [0, 3, 6, 9]
    return cache


def _refill(cache: ChunkCache) -> list[int]:
    """Fill ``cache`` again; the starts of the chunks computed, after checking the result is the right one."""
    compute = Counting()
    fill_cache(cache, compute, progress=False)
    assert np.array_equal(cache.load().raw(), _expected())
    assert cache.damaged() == [] and cache.missing() == []
    return compute.calls


def test_a_deleted_manifest_of_an_intact_cache_is_rebuilt_without_recomputing(tmp_path):
    cache = _filled(tmp_path)
    manifest = cache.manifest_path.read_bytes()
    cache.manifest_path.unlink()
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        cache.load()
    assert _refill(cache) == []
    assert cache.manifest_path.read_bytes() == manifest


def test_a_deleted_manifest_and_a_corrupt_chunk_recompute_that_chunk(tmp_path):
    cache = _filled(tmp_path)
    cache.manifest_path.unlink()
    path = cache.chunk_path(2)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one sample value, still a readable .npy
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"\['chunk_00002\.npy'\] do not match their SHA-256"):
        assert _refill(cache) == [6]  # recomputed, not listed in the rebuilt manifest as it was


def test_a_deleted_chunk_of_a_finished_cache_is_named_and_recomputed_alone(tmp_path):
    cache = _filled(tmp_path)
    cache.chunk_path(1).unlink()
    with pytest.raises(FileNotFoundError, match=r"lists chunk_00001\.npy but it is missing"):
        cache.load()
    with pytest.warns(UserWarning, match=r"chunk_00001\.npy"):
        assert _refill(cache) == [3]


def test_a_truncated_chunk_is_refused_naming_the_file(tmp_path):
    cache = _filled(tmp_path)
    path = cache.chunk_path(3)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptStoreError, match=re.escape(str(path)) + " does not match the SHA-256"):
        cache.load()
    with pytest.warns(UserWarning, match=r"chunk_00003\.npy"):
        assert _refill(cache) == [9]


def test_chunks_swapped_with_their_sidecars_are_refused_and_both_recomputed(tmp_path):
    cache = _filled(tmp_path)
    files = {p.name: p.read_bytes() for p in cache.directory.glob("chunk_*")}
    for a, b in (("chunk_00000.npy", "chunk_00001.npy"), ("chunk_00000.npy.sha256", "chunk_00001.npy.sha256")):
        (cache.directory / a).write_bytes(files[b])
        (cache.directory / b).write_bytes(files[a])
    with pytest.raises(CorruptStoreError, match=r"chunk_00000\.npy does not match the SHA-256 in .*manifest\.json"):
        cache.load()
    with pytest.warns(UserWarning, match=r"\['chunk_00000\.npy', 'chunk_00001\.npy'\] do not match"):
        assert _refill(cache) == [0, 3]
    assert {p.name: p.read_bytes() for p in cache.directory.glob("chunk_*")} == files


def test_a_kill_inside_compute_leaves_no_temporary_files_and_a_rerun_computes_the_rest(tmp_path):
    cache = _cache(tmp_path)
    killed = Counting(kill_at=2)
    with pytest.raises(KeyboardInterrupt):
        fill_cache(cache, killed, progress=False)
    assert killed.calls == [0, 3]
    assert sorted(os.listdir(cache.directory)) == ["chunk_00000.npy", "chunk_00000.npy.sha256",
                                                   "chunk_00001.npy", "chunk_00001.npy.sha256"]  # no .tmp, manifest, lock
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        cache.load()
    assert cache.missing() == [2, 3]
    assert _refill(cache) == [6, 9]

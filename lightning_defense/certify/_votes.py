"""The certification loop's vote store: one atomic ``.npy`` file per trained model.

Layout of ``directory``::

    key.json            everything that determines a model's votes (written when the store is made)
    model_000000.npy    int64 votes of model 0 on the T test points
    model_000001.npy    ...

A model counts as done exactly when its file exists: each file is written to a temporary name and
moved into place with ``os.replace``, so an interrupted run never leaves a partial file behind. Files
are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

KEY_FILE = "key.json"


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def canonical(obj: Any) -> Any:
    """``obj`` as plain JSON values (unknown objects by ``repr``), for keys and comparison."""
    return json.loads(json.dumps(obj, sort_keys=True, default=repr))


class VoteStore:
    """Per-model votes on disk, keyed by the run's configuration.

    Args:
        directory: Where the votes live.
        key: Everything that determines the votes (JSON-serialisable; see :func:`canonical`).
        num_test_points: T, the length of every vote vector.
        num_classes: Votes must lie in [0, num_classes).

    Raises:
        ValueError: If ``directory`` already holds votes for a different key.
    """

    def __init__(self, directory: str | os.PathLike[str], key: dict, num_test_points: int, num_classes: int) -> None:
        self.directory = Path(directory)
        self.key = canonical(key)
        self.num_test_points = int(num_test_points)
        self.num_classes = int(num_classes)
        self.directory.mkdir(parents=True, exist_ok=True)
        key_path = self.directory / KEY_FILE
        if key_path.exists():
            stored = json.loads(key_path.read_text())
            if stored != self.key:
                changed = sorted(k for k in set(stored) | set(self.key) if stored.get(k) != self.key.get(k))
                raise ValueError(
                    f"{self.directory} holds votes of a different configuration (differs in: {', '.join(changed)}); "
                    "choose another output_dir, or delete that directory to start over"
                )
        else:
            text = json.dumps(self.key, sort_keys=True, indent=2).encode()
            _atomic_write(key_path, lambda f: f.write(text))

    def path(self, index: int) -> Path:
        return self.directory / f"model_{int(index):06d}.npy"

    def done(self, num_models: int) -> list[int]:
        """Indices in [0, num_models) whose votes are stored."""
        return [i for i in range(num_models) if self.path(i).exists()]

    def save(self, index: int, votes: np.ndarray) -> None:
        """Stores model ``index``'s votes atomically."""
        votes = np.asarray(votes, dtype=np.int64)
        self._check(index, votes)
        _atomic_write(self.path(index), lambda f: np.save(f, votes, allow_pickle=False))

    def load(self, indices: list[int]) -> np.ndarray:
        """Votes of ``indices``, shaped (len(indices), T).

        Raises:
            FileNotFoundError: If a model's votes are missing.
            ValueError: If a stored file has the wrong shape or values.
        """
        rows = []
        for index in indices:
            path = self.path(index)
            if not path.exists():
                raise FileNotFoundError(f"votes of model {index} are missing: {path}")
            votes = np.load(path, allow_pickle=False)
            self._check(index, votes, path)
            rows.append(votes.astype(np.int64))
        return np.stack(rows) if rows else np.zeros((0, self.num_test_points), dtype=np.int64)

    def _check(self, index: int, votes: np.ndarray, path: Path | None = None) -> None:
        where = f" in {path}" if path else ""
        if votes.shape != (self.num_test_points,) or not np.issubdtype(votes.dtype, np.integer):
            raise ValueError(
                f"votes of model {index}{where} must be {self.num_test_points} integers; "
                f"got shape {votes.shape}, dtype {votes.dtype}"
            )
        if votes.size and (votes.min() < 0 or votes.max() >= self.num_classes):
            raise ValueError(
                f"votes of model {index}{where} must be classes in [0, {self.num_classes}); "
                f"got values in [{votes.min()}, {votes.max()}]"
            )

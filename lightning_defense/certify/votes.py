"""The certification loop's vote store: one verified ``.npy`` record per trained model.

Layout of ``directory`` (a :class:`~lightning_defense.core.store.RecordStore`)::

    key.json                    everything that determines a model's votes (written when the store is made)
    model_000000.npy            int64 votes of model 0 on the T test points
    model_000000.npy.sha256     its SHA-256, written after it
    model_000001.npy            ...

A model counts as done once its file and digest are both written and the file matches the digest, is
readable and holds T votes in [0, num_classes). Anything else is never used: :meth:`VoteStore.done`
reports a damaged file by name and leaves the model to be trained again; :meth:`VoteStore.load` raises
:class:`~lightning_defense.core.store.CorruptStoreError` naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from lightning.fabric.utilities import rank_zero_warn

from lightning_defense.core.store import CorruptStoreError, RecordStore

__all__ = ["VoteStore"]


class VoteStore:
    """Per-model votes on disk, keyed by the run's configuration.

    Args:
        directory: Where the votes live.
        key: Everything that determines the votes (JSON-serialisable; see
            :func:`~lightning_defense.core.store.canonical`).
        num_test_points: T, the length of every vote vector.
        num_classes: Votes must lie in [0, num_classes).

    Raises:
        ValueError: If ``directory`` already holds votes for a different key.
    """

    def __init__(self, directory: str | os.PathLike[str], key: dict, num_test_points: int, num_classes: int) -> None:
        self.records = RecordStore(directory, key)
        self.directory = self.records.directory
        self.key = self.records.key
        self.num_test_points = int(num_test_points)
        self.num_classes = int(num_classes)

    @staticmethod
    def name(index: int) -> str:
        return f"model_{int(index):06d}.npy"

    def path(self, index: int) -> Path:
        return self.records.path(self.name(index))

    def done(self, num_models: int) -> list[int]:
        """Indices in [0, num_models) whose votes are stored intact.

        A file that does not match its digest, is truncated, or holds bad votes is reported (a warning
        naming the file) and removed, so that the model trains again.
        """
        done = []
        for index in range(num_models):
            if not self.records.has(self.name(index)):
                continue
            try:
                self.load([index])
            except CorruptStoreError as err:
                rank_zero_warn(f"{err}; model {index} will be trained again")
                self.records.discard(self.name(index))
                continue
            done.append(index)
        return done

    def save(self, index: int, votes: np.ndarray) -> None:
        """Stores model ``index``'s votes atomically, with their SHA-256."""
        votes = np.asarray(votes, dtype=np.int64)
        self._check(index, votes)
        self.records.save_array(self.name(index), votes)

    def load(self, indices: list[int]) -> np.ndarray:
        """Votes of ``indices``, shaped (len(indices), T).

        Raises:
            FileNotFoundError: If a model's votes (or their digest) are missing.
            CorruptStoreError: If a stored file does not match its digest, is truncated, or has the wrong
                shape or values.
        """
        rows = []
        for index in indices:
            name = self.name(index)
            if not self.records.has(name):
                raise FileNotFoundError(f"votes of model {index} are missing: {self.path(index)} (or its .sha256)")
            votes = self.records.load_array(name)
            self._check(index, votes, self.path(index))
            rows.append(votes.astype(np.int64))
        return np.stack(rows) if rows else np.zeros((0, self.num_test_points), dtype=np.int64)

    def _check(self, index: int, votes: np.ndarray, path: Path | None = None) -> None:
        """Votes to save must be T classes (ValueError); a stored file that is not is damaged (CorruptStoreError)."""
        where, error = (f" in {path}", CorruptStoreError) if path else ("", ValueError)
        if votes.shape != (self.num_test_points,) or not np.issubdtype(votes.dtype, np.integer):
            raise error(
                f"votes of model {index}{where} must be {self.num_test_points} integers; "
                f"got shape {votes.shape}, dtype {votes.dtype}"
            )
        if votes.size and (votes.min() < 0 or votes.max() >= self.num_classes):
            raise error(
                f"votes of model {index}{where} must be classes in [0, {self.num_classes}); "
                f"got values in [{votes.min()}, {votes.max()}]"
            )

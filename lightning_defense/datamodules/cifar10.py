"""CIFAR-10 from the standard python archive in a local directory (never downloaded)."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from lightning_defense.core.batch import IndexedDataset
from lightning_defense.datamodules.base import ImageDataModule, check_fraction, seeded_split

ARCHIVE_NAME = "cifar-10-python.tar.gz"
FOLDER_NAME = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
SOURCE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Loads the CIFAR batch dicts but refuses every global except NumPy's array reconstruction.

    The archive is pickled, and pickles can run code; this unpickler allows nothing that could.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")


def _parse_batch(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        entry = _ArraysOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry[b"labels"], dtype=np.int64)
    except Exception as err:  # any parse failure means a corrupt file
        raise ValueError(
            f"CIFAR-10 batch {source} is corrupt ({err}); download a fresh copy from {SOURCE_URL}"
        ) from err
    if len(data) != len(labels):
        raise ValueError(f"CIFAR-10 batch {source} is corrupt: {len(data)} images but {len(labels)} labels")
    return data, labels


def read_cifar10(data_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read ``{"train": (uint8 NCHW, labels), "test": ...}`` from ``data_dir``.

    ``data_dir`` holds either the extracted ``cifar-10-batches-py/`` folder or ``cifar-10-python.tar.gz``.
    """
    root = Path(data_dir)
    folder, archive = root / FOLDER_NAME, root / ARCHIVE_NAME
    names = TRAIN_BATCHES + [TEST_BATCH]
    if folder.is_dir():
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{folder} lacks {', '.join(missing)}; put the complete extracted archive there ({SOURCE_URL})"
            )
        raws = {n: (folder / n).read_bytes() for n in names}
    elif archive.is_file():
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                missing = [n for n in names if n not in members]
                if missing:
                    raise ValueError(f"lacks {', '.join(missing)}")
                raws = {n: tar.extractfile(members[n]).read() for n in names}
        except (tarfile.TarError, OSError, EOFError, ValueError) as err:
            raise ValueError(f"CIFAR-10 archive {archive} is corrupt ({err}); download it again from {SOURCE_URL}") from err
    else:
        raise FileNotFoundError(
            f"CIFAR-10 not found in {root}: expected {folder} or {archive}. "
            f"Download {SOURCE_URL} and place it (or its extracted folder) in {root}"
        )
    batches = {n: _parse_batch(raws[n], n) for n in names}
    train = [batches[n] for n in TRAIN_BATCHES]
    return {
        "train": (np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])),
        "test": batches[TEST_BATCH],
    }


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 read from a local copy of the python archive; images are kept as uint8.

    Args:
        data_dir: Directory with ``cifar-10-python.tar.gz`` or its extracted ``cifar-10-batches-py/``.
        val_fraction: Fraction of the training file held out (seeded, by
            :func:`~lightning_defense.datamodules.base.seeded_split`) as the validation split: 0.1 is 5,000 of
            the 50,000 images, and validation never sees the test split. With 0 the model trains on all 50,000
            images, as the papers' recipes do, and validation uses the test split; then nothing may be fit on
            the validation split (ECLIPSE refuses to draw its sparse clean set from it).
        batch_size, num_workers, seed: see :class:`ImageDataModule`.
    """

    num_classes = 10
    num_channels = 3
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def __init__(
        self,
        data_dir: str = "data/cifar10",
        val_fraction: float = 0.1,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        check_fraction("val_fraction", val_fraction)
        self.data_dir = data_dir
        self.val_fraction = val_fraction

    def prepare_data(self) -> None:
        read_cifar10(self.data_dir)  # fail early, with the path, when the data is missing or corrupt

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        arrays = read_cifar10(self.data_dir)
        train_x, train_y = (torch.from_numpy(a) for a in arrays["train"])
        test_x, test_y = (torch.from_numpy(a) for a in arrays["test"])
        self.test_set = IndexedDataset(test_x, test_y)
        if self.val_fraction:
            val_idx, train_idx = seeded_split(len(train_x), (self.val_fraction,), self.seed)
            if len(val_idx) == 0 or len(train_idx) == 0:
                raise ValueError(
                    f"val_fraction={self.val_fraction} of the {len(train_x)} training images leaves "
                    f"{len(val_idx)} for validation and {len(train_idx)} for training; both need some"
                )
            self.val_set = IndexedDataset(train_x[val_idx], train_y[val_idx])
            train_x, train_y = train_x[train_idx], train_y[train_idx]
        else:
            self.val_set = self.test_set
        self.train_set = IndexedDataset(train_x, train_y)

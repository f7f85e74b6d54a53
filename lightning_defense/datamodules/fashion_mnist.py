"""Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017) from the standard idx files in a local directory.

Never downloaded: the files come from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``, the default) or from a torchvision download
(``<root>/FashionMNIST/raw``, with ``data_dir=<root>``).
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.datasets.mnist import read_image_file, read_label_file

from lightning_defense.core.batch import IndexedDataset
from lightning_defense.datamodules.base import ImageDataModule, check_fraction, seeded_split

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
TORCHVISION_SUBDIR = Path("FashionMNIST") / "raw"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_SIDE = 28
IMAGE_MAGIC, LABEL_MAGIC = 0x00000803, 0x00000801  # unsigned bytes; 3 dims (N, rows, cols) / 1 dim (N)
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
HOW_TO_GET = (
    "install the Debian package (`apt-get install dataset-fashion-mnist`, which puts the files in "
    f"{DEFAULT_DIR}, the default data_dir), or on a machine with internet run "
    "`torchvision.datasets.FashionMNIST(root, download=True)` and pass data_dir=<root>"
)


class CorruptIdxError(ValueError):
    """An idx file that is not what its name says (wrong magic number, shape or length; bad gzip)."""


def _find_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_fashion_mnist(data_dir: str | Path) -> dict[str, Path]:
    """The four idx files (plain or ``.gz``) in ``data_dir`` or in ``data_dir/FashionMNIST/raw``."""
    root = Path(data_dir)
    names = [n for pair in FILES.values() for n in pair]
    reports = []
    for folder in (root, root / TORCHVISION_SUBDIR):
        if not folder.is_dir():
            reports.append(f"{folder} does not exist")
            continue
        found = {n: _find_file(folder, n) for n in names}
        missing = [n for n, p in found.items() if p is None]
        if not missing:
            return found
        reports.append(f"{folder} lacks {', '.join(f'{n}[.gz]' for n in missing)}")
    raise FileNotFoundError(f"Fashion-MNIST not found: {'; '.join(reports)}. To get it, {HOW_TO_GET}")


def _read_idx(path: Path, magic: int, shape_tail: tuple[int, ...], reader) -> torch.Tensor:
    """Check the idx header and length of ``path`` (decompressed first if ``.gz``), then read it with
    torchvision's reader (which takes a plain file and asserts rather than explains)."""
    with tempfile.TemporaryDirectory(prefix="fashion_mnist_") as tmp:
        plain = path
        if path.suffix == ".gz":
            plain = Path(tmp) / path.stem
            try:
                with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
                raise CorruptIdxError(f"{path} is not a complete gzip file ({err}); get it again: {HOW_TO_GET}") from err
        ndim = 1 + len(shape_tail)
        header_size = 4 * (1 + ndim)
        with open(plain, "rb") as f:
            header = f.read(header_size)
        if len(header) < header_size:
            raise CorruptIdxError(f"{path} is truncated: {len(header)} bytes, shorter than an idx header; get it again: {HOW_TO_GET}")
        found_magic = int.from_bytes(header[:4], "big")
        if found_magic != magic:
            raise CorruptIdxError(
                f"{path} has magic number {found_magic:#010x}, expected {magic:#010x} (uint8 idx, {ndim} dims); "
                f"it is not a Fashion-MNIST {'image' if ndim == 3 else 'label'} file; get it again: {HOW_TO_GET}"
            )
        dims = tuple(int.from_bytes(header[4 * (i + 1) : 4 * (i + 2)], "big") for i in range(ndim))
        if dims[1:] != shape_tail:
            raise CorruptIdxError(f"{path} holds items of shape {dims[1:]}, expected {shape_tail}; get it again: {HOW_TO_GET}")
        expected = header_size + dims[0] * (IMAGE_SIDE * IMAGE_SIDE if ndim == 3 else 1)
        size = plain.stat().st_size
        if size != expected:
            raise CorruptIdxError(
                f"{path} is {'truncated' if size < expected else 'too long'}: its header promises {dims[0]} items "
                f"({expected} bytes) but it has {size} bytes{' decompressed' if plain != path else ''}; get it again: {HOW_TO_GET}"
            )
        return reader(str(plain))


def read_fashion_mnist(data_dir: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read ``{"train": (uint8 (N, 1, 28, 28), int64 labels), "test": ...}`` from the idx files."""
    paths = find_fashion_mnist(data_dir)
    out = {}
    for split, (image_name, label_name) in FILES.items():
        images = _read_idx(paths[image_name], IMAGE_MAGIC, (IMAGE_SIDE, IMAGE_SIDE), read_image_file)
        labels = _read_idx(paths[label_name], LABEL_MAGIC, (), read_label_file)
        if len(images) != len(labels):
            raise CorruptIdxError(
                f"{paths[image_name]} has {len(images)} images but {paths[label_name]} has {len(labels)} labels; "
                f"get both again: {HOW_TO_GET}"
            )
        bad = labels[(labels < 0) | (labels >= len(CLASSES))]
        if len(bad):
            raise CorruptIdxError(
                f"{paths[label_name]} has labels outside 0..{len(CLASSES) - 1} (e.g. {bad[0].item()}); get it again: {HOW_TO_GET}"
            )
        out[split] = (images.unsqueeze(1), labels)
    return out


def balanced_subset(indices: torch.Tensor, labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """``size / C`` seeded draws per class among ``indices`` (positions into ``labels``), sorted."""
    per_class = size // len(CLASSES)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(len(CLASSES)):
        members = indices[labels[indices] == c]
        if len(members) < per_class:
            raise ValueError(f"train_subset={size} needs {per_class} training images of class {c} "
                             f"({CLASSES[c]}); the training split has {len(members)}")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST (Xiao et al., 2017): 60,000 training and 10,000 test 28x28 grayscale images of 10
    kinds of clothing, read from the idx files; images are kept as uint8.

    Args:
        data_dir: Directory with ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each plain or ``.gz``), directly or in
            torchvision's ``FashionMNIST/raw/``. The default is where ``apt-get install
            dataset-fashion-mnist`` puts them.
        val_fraction: Fraction of the training file held out (seeded, by
            :func:`~lightning_defense.datamodules.base.seeded_split`) for validation: 0.1 is 6,000 of the
            60,000. The t10k file is the test split and is used for nothing else.
        image_size: Side length; other than 28 the images are resized (bilinear, antialiased).
        num_channels: 1 (grayscale) or 3 (the gray image repeated, for RGB models).
        train_subset: Train on this many images of the training split only: a seeded, class-balanced subset
            (``train_subset / 10`` per class), e.g. 2,500 for the poisoning benchmark's transfer setting
            (Schwarzschild et al.: a pretrained extractor fine-tuned on 2,500 images). None: all of it. The
            validation and test splits are unchanged.
        batch_size, num_workers, seed: see :class:`ImageDataModule`.
    """

    num_classes = 10
    classes = CLASSES

    def __init__(
        self,
        data_dir: str = DEFAULT_DIR,
        val_fraction: float = 0.1,
        image_size: int = 28,
        num_channels: int = 1,
        train_subset: Optional[int] = None,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        check_fraction("val_fraction", val_fraction)
        if val_fraction == 0:
            raise ValueError("val_fraction must be > 0: validation is held out of the training file, never the test file")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int; got {image_size!r}")
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3; got {num_channels}")
        if train_subset is not None and (isinstance(train_subset, bool) or not isinstance(train_subset, int)
                                         or train_subset < len(CLASSES) or train_subset % len(CLASSES)):
            raise ValueError(f"train_subset must be None or a positive multiple of {len(CLASSES)} (the same count "
                             f"per class), e.g. 2500; got {train_subset!r}")
        self.data_dir = data_dir
        self.val_fraction = val_fraction
        self.train_subset = train_subset
        self.image_size = image_size
        self.num_channels = num_channels
        self.train_indices: torch.Tensor | None = None  # positions in the training file, set by setup()
        self.val_indices: torch.Tensor | None = None

    def prepare_data(self) -> None:
        find_fashion_mnist(self.data_dir)  # fail early, with both ways to get the files, when they are missing

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        if self.image_size != IMAGE_SIDE:
            images = F.interpolate(images, size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return images.repeat(1, self.num_channels, 1, 1) if self.num_channels > 1 else images.contiguous()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        arrays = read_fashion_mnist(self.data_dir)
        train_x, train_y = arrays["train"]
        test_x, test_y = arrays["test"]
        val_idx, train_idx = seeded_split(len(train_x), (self.val_fraction,), self.seed)
        if len(val_idx) == 0 or len(train_idx) == 0:
            raise ValueError(
                f"val_fraction={self.val_fraction} of the {len(train_x)} training images leaves "
                f"{len(val_idx)} for validation and {len(train_idx)} for training; both need some"
            )
        if self.train_subset is not None:
            train_idx = balanced_subset(train_idx, train_y, self.train_subset, self.seed)
        self.train_indices, self.val_indices = train_idx, val_idx
        self.train_set = IndexedDataset(self._images(train_x[train_idx]), train_y[train_idx])
        self.val_set = IndexedDataset(self._images(train_x[val_idx]), train_y[val_idx])
        self.test_set = IndexedDataset(self._images(test_x), test_y)

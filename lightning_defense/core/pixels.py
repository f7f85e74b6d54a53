"""A user's data seen in pixel space: the one mechanism that lets every defense act on projects written
without this package's conventions.

The papers' defenses act on images in [0, 1] pixel space: FRIENDS adds noise there and clamps to [0, 1]
(Liu et al.), PGD keeps its eps ball there (Madry et al.), diffusion denoising maps [0, 1] to the DDPM's
[-1, 1] (Hong et al.; ECLIPSE). A user's project may instead:

* yield ``(x, y)`` tuples, dicts (``{"image": ..., "label": ...}``) or this package's ``(x, y, index)``
  triples: a :class:`Layout` says where the images, labels and (optional) indices are;
* normalise with a torchvision ``Normalize`` in the dataset's transform, or with a mean/std it states once
  (a ``normalization = (mean, std)`` attribute of its dataset or datamodule, or a defense's
  ``normalization=`` argument): a :class:`PixelSpace` maps its values to pixels and back;
* augment in the dataset's transform (``RandomCrop``, ``RandomHorizontalFlip``): :func:`split_transform`
  cuts a ``Compose`` into a deterministic *prefix* that gives pixels, and a *tail* (the random ops and the
  normalisation) that runs after the defense, so a per-sample rewrite lines up with its sample.

:class:`PixelView` puts the three together for one dataset: :meth:`PixelView.tensors` reads its samples as
pixels (no augmentation), :meth:`PixelView.dress` turns rewritten pixels back into items of the user's own
form (its layout, its augmentation, its normalisation). For this package's own datasets (triples in
[0, 1], no transform) the view is *native*: it hands the datasets through unchanged, byte for byte.

Nothing is clamped to hide a mismatch: data outside [0, 1] in pixel space is an error naming the fix.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from lightning_defense.core.batch import IndexedDataset, dataset_tensors, to_float_image, value_range

IMAGE_KEYS = ("image", "images", "img", "imgs", "x", "input", "inputs", "pixel_values")
LABEL_KEYS = ("label", "labels", "target", "targets", "y", "class", "cls")
INDEX_KEYS = ("index", "indices", "idx")

#: Slack of the [0, 1] check after un-normalising (float rounding of ``(p - mean) / std * std + mean``).
PIXEL_TOLERANCE = 1e-4

Key = Union[int, str]
Normalization = tuple[Sequence[float], Sequence[float]]

_NORMALIZATION_FIX = (
    "say how the images were normalised: keep torchvision's Normalize in the dataset's transform (it is read "
    "from there), or set normalization=((mean...), (std...)) on the dataset or datamodule, or pass "
    "normalization=((mean...), (std...)) to the defense"
)


# --------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """Where a batch (or a dataset item) keeps its images, labels and, optionally, sample indices.

    ``image``/``label``/``index`` are positions in a tuple or list, or keys of a dict.
    """

    image: Key = 0
    label: Key = 1
    index: Optional[Key] = None
    length: Optional[int] = None  # sequence layouts: the number of fields

    @classmethod
    def detect(cls, sample: Any, image_key: Optional[str] = None, label_key: Optional[str] = None) -> "Layout":
        """The layout of ``sample``: ``(x, y)``, ``(x, y, index)``, or a dict with image and label keys.

        Raises:
            ValueError: naming what was found and how to name the keys.
        """
        if isinstance(sample, Mapping):
            keys = list(sample.keys())
            image = image_key if image_key is not None else _find_key(keys, IMAGE_KEYS)
            label = label_key if label_key is not None else _find_key(keys, LABEL_KEYS)
            index = _find_key(keys, INDEX_KEYS)
            for what, key in (("image", image), ("label", label)):
                if key is None or key not in sample:
                    raise ValueError(
                        f"cannot tell which entry of the dict batch holds the {what}s; its keys are {keys}. Name it "
                        f"once with a {what}_key attribute on your dataset or datamodule (e.g. {what}_key = "
                        f"{keys[0]!r}), or with a callback's {what}_key= argument"
                    )
            return cls(image, label, index)
        if isinstance(sample, (tuple, list)) and len(sample) in (2, 3):
            if len(sample) == 3 and _is_index(sample[2]):
                return cls(0, 1, 2, 3)
            return cls(0, 1, None, len(sample))
        described = type(sample).__name__ + (f" of length {len(sample)}" if hasattr(sample, "__len__") else "")
        raise ValueError(
            f"cannot find the images and labels in a {described}; a batch must be (images, labels), "
            "(images, labels, indices) or a dict with an image and a label entry"
        )

    @property
    def native(self) -> bool:
        """This package's own triple ``(images, labels, indices)``."""
        return (self.image, self.label, self.index) == (0, 1, 2)

    def split(self, sample: Any) -> tuple[Any, Any, Optional[Any]]:
        """``(images, labels, indices or None)`` of a batch or item in this layout."""
        index = None if self.index is None else sample[self.index]
        return sample[self.image], sample[self.label], index

    def with_image(self, sample: Any, image: Any) -> Any:
        """``sample`` with its image replaced (a new container of the same kind; the old one is untouched)."""
        if isinstance(sample, Mapping):
            out = dict(sample)
            out[self.image] = image
            return type(sample)(out) if type(sample) is not dict else out
        fields = list(sample)
        fields[self.image] = image
        return type(sample)(fields) if isinstance(sample, list) else tuple(fields)


def _find_key(keys: list, candidates: tuple[str, ...]) -> Optional[str]:
    found = [k for k in keys if isinstance(k, str) and k.lower() in candidates]
    return found[0] if len(found) == 1 else None


def _is_index(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, Tensor) and value.dtype in (torch.int64, torch.int32) and value.ndim <= 1


# --------------------------------------------------------------------------- pixel space
@dataclass(frozen=True)
class PixelSpace:
    """The map between a user's image values and [0, 1] pixels: ``x = (p - mean) / std`` per channel.

    ``mean = std = None`` is the identity (images are already pixels). Channels are dimension -3.
    """

    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None

    @classmethod
    def of(cls, normalization: Optional[Normalization]) -> "PixelSpace":
        """From ``(mean, std)`` (sequences or scalars), or the identity for None.

        Raises:
            ValueError: a malformed pair or a std <= 0.
        """
        if normalization is None:
            return cls()
        try:
            mean, std = normalization
            mean = tuple(float(v) for v in (mean if isinstance(mean, Sequence) else [mean]))
            std = tuple(float(v) for v in (std if isinstance(std, Sequence) else [std]))
        except (TypeError, ValueError) as error:
            raise ValueError(f"normalization must be ((mean, ...), (std, ...)); got {normalization!r}") from error
        if len(mean) != len(std) or not mean or min(std) <= 0:
            raise ValueError(f"normalization needs one mean and one std > 0 per channel; got mean={mean}, std={std}")
        return cls(mean, std)

    @property
    def identity(self) -> bool:
        return self.mean is None

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = (-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        if x.ndim < 3 or x.shape[-3] not in (1, len(self.mean)) and len(self.mean) != 1:
            raise ValueError(f"normalization has {len(self.mean)} channels; the images are shaped {tuple(x.shape)}")
        return mean, std

    def to_pixels(self, x: Tensor) -> Tensor:
        """User values -> [0, 1] pixels (the identity returns ``x`` itself)."""
        if self.identity:
            return x
        mean, std = self._stats(x)
        return x * std + mean

    def from_pixels(self, pixels: Tensor) -> Tensor:
        """[0, 1] pixels -> user values (the identity returns ``pixels`` itself)."""
        if self.identity:
            return pixels
        mean, std = self._stats(pixels)
        return (pixels - mean) / std

    def check(self, pixels: Tensor, who: str, what: str = "training batch") -> None:
        """Raise unless ``pixels`` (already mapped by :meth:`to_pixels`) lie in [0, 1].

        Raises:
            ValueError: naming ``who``, the range seen and what would work.
        """
        bounds = value_range(pixels)
        if bounds is None:
            return
        low, high = bounds
        slack = 0.0 if self.identity else PIXEL_TOLERANCE
        if low < -slack or high > 1.0 + slack:
            if self.identity:
                seen = f"got {what} values in [{low:.4g}, {high:.4g}], outside [0, 1] pixels, and no normalization is known"
            else:
                seen = (f"un-normalising the {what} with mean={self.mean}, std={self.std} gives [{low:.4g}, {high:.4g}], "
                        "outside [0, 1]: that is not how these images were normalised")
            raise ValueError(f"{who}: {seen}. It acts on [0, 1] pixels and never clamps your data; {_NORMALIZATION_FIX}")

    def model(self, module: nn.Module) -> nn.Module:
        """``module`` as a function of [0, 1] pixels: ``module(from_pixels(p))`` (``module`` itself for the identity)."""
        return module if self.identity else _PixelInput(module, self)


class _PixelInput(nn.Module):
    def __init__(self, module: nn.Module, space: PixelSpace) -> None:
        super().__init__()
        self.module, self.space = module, space

    def forward(self, pixels: Tensor) -> Tensor:
        return self.module(self.space.from_pixels(pixels))


# --------------------------------------------------------------------------- transforms
_CONVERSIONS = {"ToTensor", "PILToTensor", "ConvertImageDtype", "ToImage", "ToDtype", "ToPureTensor"}
_RANDOM = {"ColorJitter", "AutoAugment", "RandAugment", "TrivialAugmentWide", "AugMix", "GaussianBlur",
           "ElasticTransform", "GaussianNoise"}


def _is_torchvision(op: Any, names: set[str]) -> bool:
    return type(op).__name__ in names and type(op).__module__.startswith("torchvision.transforms")


def _is_random(op: Any) -> bool:
    name = type(op).__name__
    return name.startswith("Random") or name in _RANDOM


class _Chain:
    """Ops applied in order (a picklable replacement for a user's ``Compose`` part)."""

    def __init__(self, ops: Sequence[Callable]) -> None:
        self.ops = list(ops)

    def __call__(self, value: Any) -> Any:
        for op in self.ops:
            value = op(value)
        return value

    def __repr__(self) -> str:
        return f"_Chain({self.ops!r})"


def _as_float(value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"the transform's pixel part gave a {type(value).__name__}, not a tensor")
    return to_float_image(value) if value.dtype == torch.uint8 else value.float()


@dataclass
class TransformSplit:
    """A torchvision ``Compose`` cut in two around the defense (see :func:`split_transform`).

    ``prefix(raw) -> pixels`` (float tensor in [0, 1], no randomness), ``tail(pixels) -> user tensor`` (the
    user's random ops and normalisation, in their order), ``space`` (the ``Normalize`` of the tail, else
    the identity) and ``random`` (whether the tail augments).
    """

    prefix: Callable
    tail: Callable
    space: PixelSpace
    random: bool


def split_transform(transform: Any) -> Optional[TransformSplit]:
    """Cut a torchvision transform (a ``Compose`` or one op, v1 or v2) into a pixel prefix and a tail.

    The prefix holds the deterministic ops before the first random op and before ``Normalize``, plus the
    conversion to a tensor (``ToTensor``, ``PILToTensor`` + ``ConvertImageDtype``, ``ToImage`` +
    ``ToDtype``) wherever it stood; the tail holds the rest in the user's order. Moving the conversion ahead
    of ``RandomCrop``/``RandomHorizontalFlip`` changes nothing (they act alike on tensors and images).

    Returns None for anything else (a function, a lambda): the caller then treats the dataset's items as
    they come.
    """
    if transform is None:
        return None
    ops = list(transform.transforms) if type(transform).__name__ == "Compose" else [transform]
    if not all(type(op).__module__.startswith("torchvision.transforms") or not _is_random(op) for op in ops):
        return None
    prefix, tail, in_tail = [], [], False
    for op in ops:
        if _is_torchvision(op, _CONVERSIONS):
            prefix.append(op)
            continue
        in_tail = in_tail or _is_random(op) or _is_torchvision(op, {"Normalize"})
        (tail if in_tail else prefix).append(op)
    if not any(_is_torchvision(op, _CONVERSIONS) for op in prefix):
        return None  # no conversion to a tensor that we can see: the items are not known to be pixels
    normalize = [op for op in tail if _is_torchvision(op, {"Normalize"})]
    if len(normalize) > 1:
        return None
    space = PixelSpace.of((normalize[0].mean, normalize[0].std)) if normalize else PixelSpace()
    return TransformSplit(_Chain([*prefix, _as_float]), _Chain(tail), space, any(_is_random(op) for op in tail))


# --------------------------------------------------------------------------- the view of one dataset
def _transform_holder(dataset: Dataset) -> tuple[list[Dataset], Optional[Dataset]]:
    """The chain of ``Subset`` wrappers above the dataset that holds ``transform``, and that dataset."""
    chain = []
    while isinstance(dataset, Subset):
        chain.append(dataset)
        dataset = dataset.dataset
    holder = dataset if getattr(dataset, "transform", None) is not None else None
    return chain, holder


def _with_transform(chain: list[Dataset], holder: Dataset, transform: Callable) -> Dataset:
    """A shallow copy of ``chain[0]`` (or ``holder``) whose transform is ``transform``; the user's objects are untouched."""
    inner = copy.copy(holder)
    inner.transform = transform
    if hasattr(inner, "transforms") and type(getattr(inner, "transforms")).__name__ == "StandardTransform":
        from torchvision.datasets.vision import StandardTransform

        inner.transforms = StandardTransform(transform, getattr(inner, "target_transform", None))
    for subset in reversed(chain):
        outer = copy.copy(subset)
        outer.dataset = inner
        inner = outer
    return inner


def _attribute(name: str, *owners: Any) -> Any:
    """The first ``name`` attribute that is set on ``owners`` (the user's dataset, then its datamodule)."""
    for owner in owners:
        value = getattr(owner, name, None)
        if value is not None:
            return value
    return None


class PixelView:
    """One dataset of a user's project as pixels in [0, 1] with labels, and back in the user's own form.

    The pixel space comes, in this order, from ``normalization`` given here, the ``Normalize`` in the
    dataset's transform, a ``normalization`` attribute of the dataset or of ``owner`` (its datamodule),
    or is the identity.

    Args:
        dataset: The user's dataset (map-style).
        normalization: ``(mean, std)`` the user's images were normalised with.
        owner: The datamodule that made ``dataset`` (searched for a ``normalization`` attribute).
        image_key, label_key: Dict items: the keys of the image and the label; else ``image_key``/``label_key``
            attributes of the dataset or of ``owner``; else found by name (``image``, ``label``, ...).
    """

    def __init__(self, dataset: Dataset, normalization: Optional[Normalization] = None, owner: Any = None,
                 image_key: Optional[str] = None, label_key: Optional[str] = None) -> None:
        self.dataset = dataset
        self._pixels: Optional[Dataset] = None  # a dressed dataset's own pixel triples
        if isinstance(dataset, DressedDataset):  # a defense's output, read again by another defense
            inner = dataset.view
            self.split, self.source, self.space, self.layout = inner.split, inner.source, inner.space, inner.layout
            self._pixels = dataset.pixels
            return
        chain, holder = _transform_holder(dataset)
        self.split = split_transform(holder.transform) if holder is not None else None
        self.source = dataset if self.split is None else _with_transform(chain, holder, self.split.prefix)
        given = normalization if normalization is not None else (
            None if self.split is not None and not self.split.space.identity
            else _attribute("normalization", holder, dataset, owner))
        if given is not None:
            self.space = PixelSpace.of(given)
            if self.split is not None and not self.split.space.identity and self.space != self.split.space:
                raise ValueError(f"normalization={given!r} disagrees with the Normalize in the dataset's transform "
                                 f"(mean={self.split.space.mean}, std={self.split.space.std}); drop one of them")
        else:
            self.space = self.split.space if self.split is not None else PixelSpace()
        keys = {name: given if given is not None else _attribute(name, holder, dataset, owner)
                for name, given in (("image_key", image_key), ("label_key", label_key))}
        self.layout = Layout.detect(self.source[0], **keys) if len(dataset) else Layout(0, 1, 2, 3)

    @property
    def native(self) -> bool:
        """This package's own form: ``(image, label, index)`` items of pixels, no transform to split."""
        return self.layout.native and self.space.identity and self.split is None

    @property
    def augments(self) -> bool:
        """Whether the dataset's own transform augments (random ops that the view replays after a rewrite)."""
        return self.split is not None and self.split.random

    def __len__(self) -> int:
        return len(self.dataset)

    def item_pixels(self, index: int) -> tuple[Tensor, Any]:
        """Sample ``index`` as ``(pixels, label)``, without the user's augmentation."""
        if self._pixels is not None:
            image, label, _ = self._pixels[index]
            return image, label
        image, label, _ = self.layout.split(self.source[index])
        if self.split is not None:
            return _as_float(image), label
        if not isinstance(image, Tensor):
            raise ValueError(
                f"{type(self.dataset).__name__} gives images as {type(image).__name__}, not tensors, and its transform "
                "(if any) is not a torchvision Compose with ToTensor that this view can read; give it a torchvision "
                "transform ending in ToTensor() (and Normalize), or return tensors from __getitem__")
        return self.space.to_pixels(image.float()), label

    def tensors(self, who: str = "this defense", batch_size: int = 256) -> tuple[Tensor, Tensor]:
        """Every sample as ``(pixels (N, C, H, W) in [0, 1], labels)``, in index order, checked.

        Raises:
            ValueError: the pixels fall outside [0, 1] (naming the fix), or the dataset's items change from one
                read to the next (augmentation this view cannot separate).
        """
        if self.native:
            images, labels = dataset_tensors(self.dataset, batch_size)
        else:
            self._check_deterministic(who)
            items = [self.item_pixels(i) for i in range(len(self))]
            images = torch.stack([image for image, _ in items])
            labels = torch.tensor([int(label) for _, label in items], dtype=torch.long)
        if images.ndim != 4:
            raise ValueError(f"{who}: the training images must be (C, H, W) each; got a set shaped {tuple(images.shape)}")
        self.space.check(images, who, "training set")
        return images, labels

    def _check_deterministic(self, who: str) -> None:
        if not len(self):
            return
        first, second = self.item_pixels(0)[0], self.item_pixels(0)[0]
        if first.shape != second.shape or not torch.equal(first, second):
            raise ValueError(
                f"{who}: sample 0 of {type(self.dataset).__name__} changes from one read to the next, so its items "
                "hold random augmentation that cannot be separated from the image (it is not a torchvision "
                "transform in dataset.transform). Put the augmentation in a torchvision Compose as "
                "dataset.transform, or in training_step, so the defense can act on the un-augmented image"
            )

    def dress(self, pixels: Dataset) -> Dataset:
        """A dataset of the user's own form over ``pixels``, a dataset of ``(pixels, label, index)`` triples
        (e.g. a rewritten training set): item i is the user's item i with its image replaced by
        ``tail(pixels[i])``, the user's augmentation and normalisation. A native view returns ``pixels`` itself."""
        if self.native:
            return pixels
        if len(pixels) != len(self):
            raise ValueError(f"the rewritten set has {len(pixels)} samples; the user's has {len(self)}")
        return DressedDataset(self, pixels)


class DressedDataset(Dataset):
    """Rewritten pixels in the user's own form (see :meth:`PixelView.dress`)."""

    def __init__(self, view: PixelView, pixels: Dataset) -> None:
        self.view, self.pixels = view, pixels

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int):
        view = self.view
        image, label, _ = self.pixels[index]
        image = view.split.tail(image) if view.split is not None else view.space.from_pixels(image)
        if view.layout.length == 2:
            return image, label
        return view.layout.with_image(view.source[index], image)  # dicts and longer tuples keep their other fields


def pixel_triples(view: PixelView, who: str = "this defense") -> Dataset:
    """The view's samples as this package's ``(pixels, label, index)`` triples (the dataset itself when native)."""
    return view.dataset if view.native else IndexedDataset(*view.tensors(who))

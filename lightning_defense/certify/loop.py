"""The certification loop: m models on independently smoothed training sets, or DPA's k partitions.

Three modes:

- ``smoothing``, randomized smoothing over the training data only (Hong, Carlini & Kurakin, Sec. 3.3,
  Pseudocode 1-2; test-time noise X = 0): model i trains on the training set rewritten by a smoothing
  wrapper with draw ``seed=i`` (Gaussian noise alone, i.e. Hong et al.'s "Gaussian-only" baseline, by
  default; diffusion denoising, ECLIPSE, ...) and votes on the clean test points; the first n0 models
  select c_A and the other n = m - n0 estimate pA (Cohen et al.'s CERTIFY); the certified l2 radius
  sigma * Phi^-1(pA) bounds the whole training set's perturbation sqrt(sum_i ||delta_i||_2^2). sigma is
  the one the wrapper states it adds to every training sample (its ``certified_sigma``), never a number
  given beside it; a wrapper that states none certifies nothing and is refused.
- ``rab``, RAB (Weber et al.): as above, and model i also votes on each test point plus its own Gaussian
  draw N(0, sigma^2 I); the radius sigma / 2 * (Phi^-1(pA) - Phi^-1(pB)) bounds the joint perturbation of
  the test input and the training set, sqrt(||delta_x||_2^2 + sum_i ||delta_i||_2^2).
- ``dpa``, Deep Partition Aggregation (Levine & Feizi): k models, model i on the training samples whose
  pixel hash is i mod k; the certificate is |T (-) U|, the insertions plus deletions of training samples
  the plurality vote survives, and floor(|T (-) U| / 2), the modified samples (clean-label poisons) it
  survives.

The trainings are sharded over every DDP rank (``lightning.fabric``), several small models train at
once per device (``training.models_per_batch``), and each model's votes are stored atomically, with
their SHA-256, as soon as it finishes (:class:`~lightning_defense.certify.votes.VoteStore`), so an
interrupted run resumes at the next untrained model; a damaged votes file is reported and retrained.
Each model trains as ``fit`` would train it on its wrapper: a wrapper's per-batch rewrite
(``train_batch_transform``, e.g. ECLIPSE's compensation) applies to its batches too.

The models are :class:`~lightning_defense.models.ImageClassifier` (``model`` holds its arguments) or
:class:`~lightning_defense.models.FastImageClassifier` (by class path), trained by the loop itself, or a
user's own ``LightningModule`` on the user's own datamodule (``model={"class_path": ..., "init_args":
...}``): the training set is read as [0, 1] pixels through :class:`~lightning_defense.core.pixels.PixelView`
(for DPA's partition and the resume key), each model trains on its training set in the user's own item
form (its layout, augmentation and normalisation), by its own ``training_step`` and
``configure_optimizers`` (:func:`~lightning_defense.certify.training.train_user_and_vote`), and votes on
the test points given in the user's input space.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from lightning_defense import datamodules
from lightning_defense.certify.dpa import (
    certified_modified_samples,
    dpa_certificate_batch,
    dpa_partition,
    median_certified_size,
)
from lightning_defense.certify.smoothing import (
    ABSTAIN,
    certified_accuracy,
    certify_batch,
    certify_rab_batch,
    plot_certified_accuracy,
)
from lightning_defense.certify.training import (
    RECIPES,
    build_model,
    build_user_model,
    pixel_batch_transform,
    train_and_vote,
    train_user_and_vote,
    user_loader,
)
from lightning_defense.certify.votes import VoteStore
from lightning_defense.core.batch import dataset_tensors, to_float_image
from lightning_defense.core.collective import Collective
from lightning_defense.core.config import resolve_class
from lightning_defense.core.device import resolve_device
from lightning_defense.core.pixels import Layout, PixelSpace, PixelView
from lightning_defense.core.store import atomic_write, canonical, fingerprint
from lightning_defense.datamodules.wrapper import TrainSplitWrapper, split_dataset
from lightning_defense.models.classifier import ImageClassifier

__all__ = [
    "DEFAULT_SMOOTHING",
    "CertificationResult",
    "TrainingOptions",
    "plot_runs",
    "run_certification",
]

MODES = ("smoothing", "rab", "dpa")
SMOOTHED_MODES = ("smoothing", "rab")  # the modes that train on smoothed copies of the training set
SELECTIONS = ("split", "all")
DEFAULT_SMOOTHING = {"class_path": "lightning_defense.datamodules.GaussianNoiseDataModule", "init_args": {}}
"""The default smoothing wrapper: Gaussian noise on the training data alone. With clean test inputs (mode
``smoothing``) this is Hong et al.'s "Gaussian-only" baseline; with mode ``rab`` it is RAB's training-set
noise. Its sigma comes from ``sigma``."""
# Bump when the training loop changes what a model's votes are (2: core fingerprints, digests; 3: the
# wrapper's train_batch_transform applies to the models' batches, sigma is the wrapper's certified_sigma; 4: a
# last batch of one image joins the batch before it, which changes the models of training sets of n = 1 mod batch).
FORMAT_VERSION = 4

CERTIFICATES_CSV = "certificates.csv"
CURVE_CSV = "certified_accuracy.csv"
CURVE_PNG = "certified_accuracy.png"
SUMMARY_JSON = "summary.json"

# What each mode's certificate bounds (summary.json's "certifies", the plots' x-axis).
CERTIFIES = {
    "smoothing": "l2 norm of the whole training set's perturbation, sqrt(sum_i ||delta_i||_2^2), in [0, 1] pixel "
                 "units (Hong et al., test inputs not perturbed); r poisoned samples of equal norm: radius / sqrt(r) each",
    "rab": "l2 norm of the joint perturbation of the test input and the whole training set, "
           "sqrt(||delta_x||_2^2 + sum_i ||delta_i||_2^2), in [0, 1] pixel units (RAB, Weber et al.)",
    "dpa": "number of training samples inserted plus deleted, |T (-) U| (Levine & Feizi); a modified sample "
           "(clean-label poison) is one deletion plus one insertion, so floor(size / 2) modified samples",
}
RADIUS_XLABEL = {"smoothing": "radius (l2 over the whole training set)",
                 "rab": "radius (l2 over the test input and the whole training set)"}
DPA_XLABEL = "modified training samples (clean-label poisons)"
DPA_TOP_XLABEL = "training samples inserted + deleted, |T (-) U|"
DPA_CURVE_HEADER = ["certified_modified_samples", "certified_insertions_deletions", "certified_accuracy"]


@dataclass
class TrainingOptions:
    """How each model trains, and where the loop runs.

    Each model trains with its class's recipe (ImageClassifier's or FastImageClassifier's) in a plain loop on
    its rank's device; the batch size is the datamodule's.

    Args:
        max_epochs: Epochs per model.
        limit_train_batches: At most this many batches per epoch (None: the whole training set).
        models_per_batch: Models trained at once on one device as one network (layers stacked along the
            channels, else ``torch.func.vmap`` over stacked weights; see
            :func:`~lightning_defense.certify.training.train_and_vote`), in smoothing and RAB modes (DPA's
            partitions differ in size and train one at a time). BatchNorm works: each model's statistics are
            its own, so a group trains the same models as one by one, up to floating-point rounding.
        accelerator: ``"cpu"``, ``"gpu"``, ``"auto"``, ... (as for Lightning).
        devices: Devices per node; with more than one process the models are sharded over all of them.
        num_nodes: Nodes.
    """

    max_epochs: int = 10
    limit_train_batches: Optional[int] = None
    models_per_batch: int = 1
    accelerator: str = "auto"
    devices: Union[int, str] = 1
    num_nodes: int = 1


@dataclass
class CertificationResult:
    """What :func:`run_certification` produced.

    Attributes:
        output_dir: The run's directory.
        complete: False when the run stopped early (``max_models``); outputs are written only when True.
        trained: Indices of the models trained by this call (on all ranks), in order.
        votes: (m, T) votes of all models when complete, else None.
        summary: The figures also written to ``summary.json`` (empty when incomplete).
        files: Output name -> path (certificates, curve CSV and PNG, summary).
    """

    output_dir: Path
    complete: bool
    trained: list[int]
    votes: Optional[np.ndarray] = None
    summary: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- argument checks


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def _check_arguments(data, model, smoothing, mode, num_models, n0, selection, alpha, sigma, training, max_models,
                     num_classes=None):
    """Every argument checked before any process starts.

    Returns:
        ``(training, recipe, wrapper, sigma, user)``: :class:`TrainingOptions`, one of the library's
        :data:`~lightning_defense.certify.training.RECIPES` as ``(class, init_args)`` (None for a user's module),
        the smoothing wrapper's ``(class, init_args)`` (None for DPA), the radius' sigma, the wrapper's
        ``certified_sigma`` (None for DPA), and a user's LightningModule as ``(class, init_args)`` (None for a
        recipe).
    """
    training = training if training is not None else TrainingOptions()
    if isinstance(training, Mapping):
        training = TrainingOptions(**training)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS} ('split': n0 models select, the rest estimate; "
                         f"'all': all m models do both, as the paper); got {selection!r}")
    _check_int("num_models", num_models, 2 if mode in SMOOTHED_MODES else 1)
    if mode in SMOOTHED_MODES:
        _check_int("n0", n0, 1)
        if selection == "split" and n0 >= num_models:
            raise ValueError(f"n0 must be < num_models so that n = m - n0 >= 1 models estimate pA; "
                             f"got n0={n0}, num_models={num_models}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}")
    _check_int("training.max_epochs", training.max_epochs, 1)
    _check_int("training.models_per_batch", training.models_per_batch, 1)
    if training.limit_train_batches is not None:
        _check_int("training.limit_train_batches", training.limit_train_batches, 1)
    if max_models is not None:
        _check_int("max_models", max_models, 0)
    user, recipe = None, (ImageClassifier, dict(model or {}))
    if isinstance(model, Mapping) and "class_path" in model:
        user, recipe = _user_model(model)
        if user is not None and training.models_per_batch != 1:
            raise ValueError(f"training.models_per_batch={training.models_per_batch}: only "
                             f"{' and '.join(c.__name__ for c in RECIPES)} models train several at once; "
                             f"{user[0].__name__} trains one at a time, set it to 1")
    if num_classes is not None:
        _check_int("num_classes", num_classes, 2)
        if user is None:
            raise ValueError("num_classes is for a user's LightningModule (model.class_path); ImageClassifier runs "
                             "take the datamodule's num_classes")
    for linked in ("num_classes", "in_chans"):
        if recipe is not None and linked in recipe[1]:
            raise ValueError(f"model.{linked} comes from the datamodule; remove it from the model arguments")
    if not isinstance(data, L.LightningDataModule):
        raise ValueError(f"data must be a LightningDataModule; got {type(data).__name__}")
    wrapper = None
    if mode in SMOOTHED_MODES:
        wrapper_cls, wrapper_args, sigma = resolve_smoothing(
            smoothing if smoothing is not None else DEFAULT_SMOOTHING, sigma, data)
        wrapper = (wrapper_cls, wrapper_args)
    elif smoothing is not None:
        raise ValueError("mode 'dpa' partitions the training set as it is; set smoothing to null")
    else:
        sigma = None
    return training, recipe, wrapper, sigma, user


def _user_model(spec: Mapping) -> tuple[Optional[tuple[type, dict]], Optional[tuple[type, dict]]]:
    """``model={"class_path": ..., "init_args": {...}}`` checked: ``((class, init_args), None)`` for a user's
    LightningModule, or ``(None, (class, init_args))`` when it names one of the library's
    :data:`~lightning_defense.certify.training.RECIPES` (trained by the loop itself, several at once).

    Raises:
        ValueError: Other keys, a class that is not a LightningModule, or init_args it does not take.
    """
    unknown = set(spec) - {"class_path", "init_args"}
    if unknown:
        raise ValueError(f"model takes class_path and init_args (or ImageClassifier's arguments); got also "
                         f"{sorted(unknown)}")
    cls = resolve_class(spec["class_path"], L.LightningModule, "model.class_path")
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, Mapping):
        raise ValueError(f"model.init_args must be a mapping; got {init_args!r}")
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        bad = sorted(set(init_args) - set(params) - {"self"})
        if bad:
            raise ValueError(f"model.init_args {bad} are not arguments of {cls.__name__}; it takes "
                             f"{sorted(n for n in params if n != 'self')}")
    return ((None, (cls, dict(init_args))) if cls in RECIPES else ((cls, dict(init_args)), None))


def certifying_wrappers() -> list[str]:
    """The wrappers of :mod:`lightning_defense.datamodules` that state the sigma they certify (``certified_sigma``)."""
    return sorted(name for name in datamodules.__all__ if hasattr(getattr(datamodules, name), "certified_sigma"))


def _certifies_nothing(cls: type, why: str) -> ValueError:
    return ValueError(
        f"smoothing.class_path {cls.__name__} certifies no sigma ({why}): the smoothing radius holds only for a "
        "wrapper that adds N(0, sigma^2 I) to every training sample and states that sigma as certified_sigma. "
        f"Wrappers that do (where certified_sigma is not None): {', '.join(certifying_wrappers())}")


def resolve_smoothing(smoothing: Mapping, sigma: Optional[float], data: L.LightningDataModule) -> tuple[type, dict, float]:
    """Checks a smoothing wrapper spec and returns ``(class, init_args, certified sigma)``.

    The wrapper must be a LightningDataModule taking ``base=`` and ``seed=``, which the loop injects (the
    configured datamodule, and the model's draw index), and must state the noise it certifies as
    ``certified_sigma`` (read from ``cls(base=data, seed=0, **init_args)``, which sets nothing up): the
    radius uses that sigma only. ``sigma`` sets the wrapper's noise where the wrapper takes a ``sigma``
    argument that ``init_args`` leaves unset (then one of them is required); otherwise it must agree with
    the wrapper's.

    Raises:
        ValueError: On a malformed spec, an unimportable or unsuitable class, unknown or injected
            init_args, a wrapper that certifies no sigma, no sigma where the wrapper takes one, or a
            ``sigma`` that disagrees with the wrapper's.
    """
    if not isinstance(smoothing, Mapping) or "class_path" not in smoothing:
        raise ValueError(
            "smoothing must be a mapping {class_path: ..., init_args: {...}}, e.g. "
            f"{DEFAULT_SMOOTHING}; got {smoothing!r}"
        )
    unknown = set(smoothing) - {"class_path", "init_args"}
    if unknown:
        raise ValueError(f"smoothing takes only class_path and init_args; got also {sorted(unknown)}")
    cls = resolve_class(smoothing["class_path"], L.LightningDataModule, "smoothing.class_path",
                        default_module="lightning_defense.datamodules")
    init_args = dict(smoothing.get("init_args") or {})
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for injected in ("base", "seed"):
        if injected in init_args:
            raise ValueError(f"smoothing.init_args must not set {injected!r}: the loop injects it (the data, "
                             "and the model's draw index)")
    takes = lambda name: name in params or takes_any  # noqa: E731
    if not takes("base"):
        raise ValueError(f"smoothing.class_path {cls.__name__} must accept base=, which the loop injects")
    if not hasattr(cls, "certified_sigma"):
        raise _certifies_nothing(cls, "it has no certified_sigma")
    if not takes("seed"):
        raise ValueError(f"smoothing.class_path {cls.__name__} must accept seed=, which the loop injects")
    accepted = sorted(name for name in params if name != "self")
    bad = [name for name in init_args if name not in params and not takes_any]
    if bad:
        raise ValueError(f"smoothing.init_args {bad} are not arguments of {cls.__name__}; it takes {accepted}")
    if sigma is not None and not float(sigma) > 0:
        raise ValueError(f"sigma must be > 0; got {sigma}")
    if "sigma" not in init_args and takes("sigma"):
        if sigma is None:
            raise ValueError(f"sigma is needed for the certified radius: {cls.__name__} takes sigma, the noise it "
                             "certifies; set sigma or smoothing.init_args.sigma")
        init_args["sigma"] = sigma
    certified = cls(base=data, seed=0, **init_args).certified_sigma
    if certified is None:
        raise _certifies_nothing(cls, f"its certified_sigma is None with init_args {init_args}")
    certified = float(certified)
    if not certified > 0:
        raise ValueError(f"{cls.__name__}.certified_sigma must be > 0; got {certified}")
    if sigma is not None and not math.isclose(float(sigma), certified, rel_tol=1e-6):
        raise ValueError(
            f"sigma={sigma} disagrees with the sigma {cls.__name__} certifies with init_args {init_args}: "
            f"{certified:.6g} (its certified_sigma); the radius uses the wrapper's sigma. Omit sigma, or set "
            "the wrapper's noise through its own arguments")
    return cls, init_args, certified


def _test_points(test_set, num_test_points: Optional[int], test_indices: Optional[Sequence[int]]):
    indices = _test_indices(len(test_set), num_test_points, test_indices)
    items = [test_set[int(i)] for i in indices]
    images = to_float_image(torch.stack([item[0] for item in items]))
    labels = torch.as_tensor([int(item[1]) for item in items], dtype=torch.long)
    return indices, images, labels


def _test_indices(size: int, num_test_points: Optional[int], test_indices: Optional[Sequence[int]]) -> np.ndarray:
    if num_test_points is not None and test_indices is not None:
        raise ValueError("give num_test_points or test_indices, not both")
    if test_indices is not None:
        indices = np.asarray(list(test_indices), dtype=np.int64)
        if indices.size == 0 or len(np.unique(indices)) != indices.size or indices.min() < 0 or indices.max() >= size:
            raise ValueError(f"test_indices must be distinct indices in [0, {size}) of the test split; got {list(test_indices)}")
    else:
        if num_test_points is not None:
            _check_int("num_test_points", num_test_points, 1)
            if num_test_points > size:
                raise ValueError(f"num_test_points={num_test_points} exceeds the test split's {size} samples")
        indices = np.arange(size if num_test_points is None else num_test_points)
    return indices


def _with_defaults(cls: type, args: Mapping, skip: set) -> dict:
    """``args`` completed with ``cls``'s defaults, so that a config and its spelled-out form key alike."""
    params = inspect.signature(cls.__init__).parameters
    full = {n: p.default for n, p in params.items()
            if n != "self" and n not in skip and p.default is not inspect.Parameter.empty
            and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}
    full.update(args)
    return full


# --------------------------------------------------------------------------- the run


def run_certification(
    data: L.LightningDataModule,
    *,
    model: Optional[Mapping] = None,
    smoothing: Optional[Mapping] = None,
    mode: str = "smoothing",
    num_models: int = 32,
    n0: int = 8,
    selection: str = "split",
    alpha: float = 0.001,
    sigma: Optional[float] = None,
    num_test_points: Optional[int] = None,
    test_indices: Optional[Sequence[int]] = None,
    training: Optional[TrainingOptions] = None,
    output_dir: Union[str, os.PathLike] = "runs/certify",
    seed: int = 0,
    max_models: Optional[int] = None,
    report_radii: Sequence[float] = (0.0, 0.1, 0.25, 0.5, 1.0),
    progress_bar: bool = True,
    collective_data_setup: Optional[bool] = None,
    num_classes: Optional[int] = None,
) -> CertificationResult:
    """Trains m models (or DPA's k), collects their votes, and certifies the test points.

    Smoothing mode (Hong et al., Pseudocode 2): model i trains on ``smoothing`` applied to ``data`` with
    draw ``seed=i`` and votes on the clean test points. With ``selection="split"`` the first n0 models
    select c_A and the remaining n = m - n0 estimate pA, as Cohen et al.'s CERTIFY requires.
    ``selection="all"`` is the paper's variant that uses all m votes for both; it is **not a valid Cohen
    bound strictly** (the same votes select and estimate) and is offered to reproduce the paper's figures.
    The radius sigma * Phi^-1(pA) bounds the l2 norm of the whole training set's perturbation.

    RAB mode (Weber et al.): as smoothing mode, and model i votes on each test point t plus its own
    Gaussian draw sigma * N(0, I), keyed by ``(seed, i, t)``; the certificate is
    :func:`~lightning_defense.certify.smoothing.certify_rab_batch`, whose radius bounds the l2 norm of the
    joint perturbation of the test input and the whole training set.

    Both radii assume that the wrapper adds N(0, sigma^2 I) to every training sample, as
    GaussianNoiseDataModule does (what follows, e.g. diffusion denoising, is part of the learner); sigma is
    the wrapper's ``certified_sigma`` (GaussianNoiseDataModule's and DiffusionPurifiedDataModule's sigma, or
    the pixel-space sigma of a fixed timestep; EclipseDataModule's t* noise level), recorded in
    ``summary.json``. A wrapper without one (ISS, Deep k-NN, ...) is refused. Each model trains as ``fit``
    trains on its wrapper: the wrapper's ``train_batch_transform`` (ECLIPSE's compensation) applies to every
    batch, drawing from the stream keyed by ``(seed, i)``.

    DPA mode (Levine & Feizi): ``num_models`` is the number of partitions k; model i trains on the
    training samples with ``dpa_partition(images, k) == i``; ``smoothing``, n0, selection and alpha are
    not used.

    Outputs in ``output_dir`` (global rank 0): ``votes/`` (one file per model with its SHA-256, the resume
    state; a file that fails its check is reported and the model trained again),
    ``certificates.csv``, ``certified_accuracy.csv`` and ``.png``, ``summary.json``.

    With more than one process (``training.devices`` or ``num_nodes``) the loop launches DDP itself,
    re-running the current script per process, as Lightning's ``ddp`` strategy does; call it from a
    script or the ``lightning-defense certify`` command then.

    Args:
        data: The (possibly poisoned) datamodule; its training split is smoothed or partitioned.
        model: ``ImageClassifier`` arguments without num_classes/in_chans (taken from ``data``), the same for
            ``{"class_path": "lightning_defense.models.FastImageClassifier", "init_args": {...}}``, or a user's own
            LightningModule ``{"class_path": "my_pkg.MyModule", "init_args": {...}}`` (model i is
            ``MyModule(**init_args)`` built under its own seed). A user's module trains on ``data`` as its own
            training loader serves it (batch size, collate, the items' layout, augmentation and
            normalisation; ``data`` need not have ``num_classes``, ``train_set`` or ``test_set``: its loaders'
            datasets are used) by its own ``training_step`` and ``configure_optimizers``, one model at a time,
            and votes with ``argmax(module(x))``; noise and partitions act on [0, 1] pixels (see
            :class:`~lightning_defense.core.pixels.PixelView`).
        smoothing: Wrapper spec ``{class_path, init_args}`` instantiated per model as
            ``cls(base=data, seed=i, **init_args)``; default :data:`DEFAULT_SMOOTHING`.
        mode: ``"smoothing"`` (Hong et al.), ``"rab"`` (Weber et al.) or ``"dpa"`` (Levine & Feizi).
        num_models: m (smoothing) or k partitions (DPA).
        n0: Selection models (smoothing, ``selection="split"``), 1 <= n0 < m.
        selection: ``"split"`` or ``"all"``.
        alpha: Failure probability of the certificate.
        sigma: The wrapper's noise, injected as ``smoothing.init_args.sigma`` where the wrapper takes
            ``sigma`` and ``init_args`` does not set it; otherwise it must agree with the wrapper's
            ``certified_sigma``, which is the radius' sigma in every case.
        num_test_points: Certify the first this many test points (default: the whole test split).
        test_indices: Or exactly these test-split indices.
        training: :class:`TrainingOptions`.
        output_dir: Where votes and outputs go; a rerun with the same configuration resumes there.
        seed: Seeds every model's initialisation, shuffling and augmentation (with its index).
        max_models: Train at most this many models in this call, then stop (for budgets and tests).
        report_radii: Radii (DPA: certified sizes, both in insertions plus deletions and in modified samples)
            at which the summary reports certified accuracy.
        progress_bar: A tqdm bar over models on rank 0.
        collective_data_setup: Under DDP, whether every rank sets up every model's smoothed training set
            together (needed by wrappers whose setup runs collectives, e.g. DiffusionPurifiedDataModule,
            which then shares each draw's purification over the ranks). None: the wrapper class's
            ``collective_setup`` attribute, else True for DiffusionPurifiedDataModule, else False.
        num_classes: A user's module: the number of classes (default: ``data.num_classes``, else the largest
            label of the training and test sets plus one).

    Returns:
        A :class:`CertificationResult`.

    Raises:
        ValueError: On bad arguments, or when ``output_dir`` holds votes of another configuration.

    Example::

        result = run_certification(
            DigitsDataModule(image_size=16), model={"backbone": "small_cnn", "flip": False},
            smoothing={"class_path": "lightning_defense.datamodules.GaussianNoiseDataModule",
                       "init_args": {"sigma": 0.25}},
            num_models=40, n0=10, training=TrainingOptions(max_epochs=5, accelerator="cpu"),
        )
        print(result.summary["certified_accuracy"])
    """
    training, recipe, wrapper, sigma, user = _check_arguments(
        data, model, smoothing, mode, num_models, n0, selection, alpha, sigma, training, max_models, num_classes)
    fabric = _launch(training)
    collective = Collective(fabric)
    if user is None:
        setup = _set_up_data(data, fabric, collective, num_test_points, test_indices)
    else:
        setup = _set_up_user_data(data, fabric, collective, num_test_points, test_indices, num_classes)
    training_sets = _TrainingSets(setup, mode, num_models, wrapper, collective, collective_data_setup)

    # Resume: rank 0 finds the models whose votes are already stored under this configuration's key.
    output_dir = Path(output_dir)
    key = (_resume_key(mode, seed, setup, recipe, training, wrapper, sigma, num_models, user)
           if collective.rank == 0 else None)
    store, todo = _open_vote_store(collective, output_dir, key, num_models, setup)
    if max_models is not None:
        todo = todo[:max_models]

    # For i = 1..m: model i trains on D_i and votes on the test points (sharded over the ranks), on this rank's device.
    device = resolve_device(collective.device, stage="certify.train")
    trained = _train_sharded(
        collective, todo, 1 if mode == "dpa" else training.models_per_batch, store, training_sets,
        build=lambda i: build_model(recipe, setup.num_classes, setup.in_chans, seed, i),
        test_images=setup.test_images, seed=seed, training=training, batch_size=setup.batch_size,
        progress_bar=progress_bar and collective.rank == 0,
        test_sigma=sigma if mode == "rab" else None, test_keys=setup.test_indices,
        device=device,
        train_user=None if user is None else _user_trainer(user, setup, seed, training, device,
                                                           sigma if mode == "rab" else None),
    )

    # CERTIFY (or DPA's plurality vote) once every model has voted.
    return _certify_and_write(collective, store, output_dir, trained, setup, mode, num_models, n0, selection,
                              alpha, sigma, training_sets.partition, report_radii,
                              sigma_from=f"{wrapper[0].__name__}.certified_sigma" if wrapper is not None else None)


# --------------------------------------------------------------------------- set-up


def _launch(training: TrainingOptions) -> L.Fabric:
    """One process per device: Fabric's DDP (re-running the script per process), or this process alone."""
    single = training.devices in (1, "1") and training.num_nodes == 1
    fabric = L.Fabric(
        accelerator=training.accelerator, devices=training.devices, num_nodes=training.num_nodes,
        strategy="auto" if single else "ddp",
    )
    fabric.launch()
    return fabric


@dataclass
class _Data:
    """The configured data as the loop uses it: the training split as tensors and the certified test points."""

    module: L.LightningDataModule
    num_classes: int
    in_chans: int
    batch_size: int
    train_images: Tensor
    train_labels: Tensor
    test_indices: np.ndarray
    test_images: Tensor
    test_labels: Tensor
    user: Optional["_UserData"] = None


@dataclass
class _UserData:
    """A user's datamodule as the loop uses it beside :class:`_Data` (whose images are then [0, 1] pixels)."""

    loader: DataLoader  # the user's training loader: its batch size and collate
    train_set: Dataset  # the user's training set
    layout: Layout  # of the training items
    train_space: PixelSpace
    test_space: PixelSpace


def _set_up_user_data(data: L.LightningDataModule, fabric: L.Fabric, collective: Collective,
                      num_test_points: Optional[int], test_indices: Optional[Sequence[int]],
                      num_classes: Optional[int]) -> _Data:
    """A user's datamodule: ``prepare_data`` once per node, ``setup("fit")`` and ``setup("test")`` on every rank;
    the training and test sets are found as the smoothing wrappers find them
    (:func:`~lightning_defense.datamodules.wrapper.split_dataset`: ``train_set``/``test_set``, else the dataset of
    ``train_dataloader()``/``test_dataloader()``) and read as [0, 1] pixels by
    :class:`~lightning_defense.core.pixels.PixelView`; the training loader is the model's loader template.

    Raises:
        ValueError: No single DataLoader over a map-style training or test set, or pixels outside [0, 1]
            (naming the fix).
    """
    if fabric.local_rank == 0:
        data.prepare_data()
    collective.barrier("certify: prepare_data")
    data.setup("fit")
    loader, train_set = data.train_dataloader(), split_dataset(data, "train")
    data.setup("test")
    test_set = split_dataset(data, "test")
    name = type(data).__name__
    if not isinstance(loader, DataLoader) or train_set is None:
        raise ValueError(f"{name}.train_dataloader() must return one torch DataLoader over a map-style dataset for "
                         f"the certification loop; got {type(loader).__name__}")
    if test_set is None:
        raise ValueError(f"{name} has no test set: set test_set in setup() or define test_dataloader()")
    train_view, test_view = PixelView(train_set, owner=data), PixelView(test_set, owner=data)
    train_images, train_labels = train_view.tensors("run_certification (training set)")
    indices = _test_indices(len(test_set), num_test_points, test_indices)
    items = [test_view.item_pixels(int(i)) for i in indices]
    test_images = torch.stack([image for image, _ in items])
    test_labels = torch.as_tensor([int(label) for _, label in items], dtype=torch.long)
    test_view.space.check(test_images, "run_certification", "test points")
    if num_classes is None:
        num_classes = getattr(data, "num_classes", None) or int(max(train_labels.max(), test_labels.max())) + 1
    user = _UserData(loader, train_set, train_view.layout, train_view.space, test_view.space)
    return _Data(data, int(num_classes), int(train_images.shape[1]), loader.batch_size, train_images, train_labels,
                 indices, test_images, test_labels, user)


def _user_trainer(user: tuple[type, dict], data: _Data, seed: int, training: TrainingOptions, device: torch.device,
                  test_sigma: Optional[float]):
    """``train(i, training set, batch transform) -> votes`` for a user's LightningModule."""
    cls, init_args = user
    info = data.user

    def train(i: int, training_set: Dataset, transform) -> Tensor:
        if getattr(transform, "__func__", None) is TrainSplitWrapper.train_batch_transform:
            transform = None  # the wrapper rewrites no batch
        if transform is not None:
            transform = pixel_batch_transform(transform, info.layout, info.train_space)
        return train_user_and_vote(
            build_user_model(cls, init_args, seed, i), i, user_loader(info.loader, training_set, seed, i),
            data.test_images, info.test_space, data.num_classes, seed=seed, max_epochs=training.max_epochs,
            limit_train_batches=training.limit_train_batches, device=device, test_sigma=test_sigma,
            test_keys=data.test_indices, batch_transform=transform,
        )

    return train


def _set_up_data(data: L.LightningDataModule, fabric: L.Fabric, collective: Collective,
                 num_test_points: Optional[int], test_indices: Optional[Sequence[int]]) -> _Data:
    """``prepare_data`` once per node, ``setup`` on every rank, then the training split and the test points."""
    if fabric.local_rank == 0:
        data.prepare_data()
    collective.barrier("certify: prepare_data")
    data.setup("fit")
    if getattr(data, "test_set", None) is None:
        data.setup("test")
    num_classes, in_chans = getattr(data, "num_classes", None), getattr(data, "num_channels", None)
    if not num_classes or not in_chans or getattr(data, "train_set", None) is None or data.test_set is None:
        raise ValueError(f"{type(data).__name__} must expose num_classes, num_channels, train_set and test_set for "
                         "ImageClassifier models; to certify your own LightningModule on your own datamodule, give "
                         "model={'class_path': 'my_pkg.MyModule', 'init_args': {...}}")
    indices, test_images, test_labels = _test_points(data.test_set, num_test_points, test_indices)
    train_images, train_labels = dataset_tensors(data.train_set)
    return _Data(data, num_classes, in_chans, int(getattr(data, "batch_size", 128)), train_images, train_labels,
                 indices, test_images, test_labels)


class _TrainingSets:
    """D_i, model i's training set: draw ``seed=i`` of the smoothing wrapper over the data (Hong et al.,
    Pseudocode 2), or partition i of the training samples (DPA, Levine & Feizi).

    ``shared`` (smoothing under DDP): every rank sets up every model's set of a round together, for
    wrappers whose setup runs collectives (see ``collective_data_setup`` of :func:`run_certification`).
    """

    def __init__(self, data: _Data, mode: str, num_models: int, wrapper: Optional[tuple[type, dict]],
                 collective: Collective, collective_data_setup: Optional[bool]) -> None:
        self.data, self.wrapper, self.collective = data, wrapper, collective
        self.partition = dpa_partition(data.train_images, num_models) if mode == "dpa" else None
        self.shared = False
        if mode in SMOOTHED_MODES and collective.world_size > 1:
            self.shared = (collective_data_setup if collective_data_setup is not None
                           else _setup_is_collective(wrapper[0]))

    def set_up(self, i: int):
        """Model i's ``(training set, per-batch transform)``: a Dataset set up by the smoothing wrapper and its
        ``train_batch_transform`` (None without one), or DPA's ``(images, labels)`` and None."""
        if self.partition is not None:
            keep = self.partition == i
            if self.data.user is not None:  # the user's own items (layout, augmentation, normalisation)
                return Subset(self.data.user.train_set, torch.nonzero(keep).flatten().tolist()), None
            return (self.data.train_images[keep], self.data.train_labels[keep]), None
        wrapper_cls, wrapper_args = self.wrapper
        wrapper = wrapper_cls(base=self.data.module, seed=i, **wrapper_args)
        if hasattr(wrapper, "use_collective"):
            wrapper.use_collective(self.collective)
        wrapper.prepare_data()
        wrapper.setup("fit")
        return wrapper.train_set, getattr(wrapper, "train_batch_transform", None)

    @staticmethod
    def tensors(training_set) -> tuple[Tensor, Tensor]:
        return training_set if isinstance(training_set, tuple) else dataset_tensors(training_set)


def _setup_is_collective(wrapper_cls: type) -> bool:
    """Whether a wrapper's setup shares its offline work over the DDP ranks (all ranks must call it together)."""
    flag = getattr(wrapper_cls, "collective_setup", None)
    if flag is not None:
        return bool(flag)
    return any(c.__name__ == "DiffusionPurifiedDataModule" for c in wrapper_cls.__mro__)


# --------------------------------------------------------------------------- resume


def _resume_key(mode: str, seed: int, data: _Data, recipe: Optional[tuple[type, dict]], training: TrainingOptions,
                wrapper: Optional[tuple[type, dict]], sigma: Optional[float], num_models: int,
                user: Optional[tuple[type, dict]] = None) -> dict:
    """Everything that determines a model's votes. In smoothing mode m is not in it: a larger m reuses the
    models already trained. A user's module: its class path and init_args (with defaults), the classes, and
    the pixel spaces of the training and test data."""
    key = {
        "format": FORMAT_VERSION,
        "mode": mode,
        "seed": seed,
        "data": {"class": f"{type(data.module).__module__}.{type(data.module).__qualname__}",
                 "train_sha256": fingerprint(data.train_images, data.train_labels),
                 "test_sha256": fingerprint(data.test_indices, data.test_images, data.test_labels)},
        "model": _model_key(recipe, {"num_classes", "in_chans"}) if user is None else _model_key(user, set()),
        "training": {"max_epochs": training.max_epochs, "limit_train_batches": training.limit_train_batches,
                     "batch_size": data.batch_size},
    }
    if wrapper is not None:
        wrapper_cls, wrapper_args = wrapper
        key["smoothing"] = {"class_path": f"{wrapper_cls.__module__}.{wrapper_cls.__qualname__}",
                            "init_args": _with_defaults(wrapper_cls, wrapper_args, {"base", "seed"}),
                            "certified_sigma": sigma}
    else:
        key["num_partitions"] = num_models
    if user is not None:
        spaces = {"train_space": data.user.train_space, "test_space": data.user.test_space}
        key["data"].update(num_classes=data.num_classes, **{k: [s.mean, s.std] for k, s in spaces.items()})
    return key


def _model_key(spec: tuple[type, dict], skip: set) -> dict:
    """A model's class and arguments (with defaults) in a resume key: ImageClassifier's as its arguments alone (the
    key of runs written before other classes were keyed), any other class with its class path."""
    cls, args = spec
    if cls is ImageClassifier:
        return _with_defaults(cls, args, skip)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": _with_defaults(cls, args, skip)}


def _open_vote_store(collective: Collective, output_dir: Path, key: Optional[dict], num_models: int,
                     data: _Data) -> tuple[Optional[VoteStore], list[int]]:
    """Rank 0 opens ``output_dir/votes`` and lists the models without intact votes; every rank gets the list.

    Returns ``(store, todo)``; the store is None on the other ranks.

    Raises:
        ValueError: On every rank, when the directory holds votes of another configuration.
    """
    store, todo, error = None, None, None
    if collective.rank == 0:
        try:
            store = VoteStore(output_dir / "votes", key, len(data.test_indices), data.num_classes)
            done = store.done(num_models)
            todo = [i for i in range(num_models) if i not in set(done)]
            if done:
                print(f"certify: resuming in {output_dir}: {len(done)} of {num_models} models already done")
        except ValueError as err:
            error = str(err)
    todo, error = collective.broadcast((todo, error), src=0)
    if error:
        raise ValueError(error)
    return store, todo


# --------------------------------------------------------------------------- training


def _train_sharded(collective: Collective, todo: list[int], models_per_batch: int, store: Optional[VoteStore],
                   training_sets: _TrainingSets, *, build, test_images: Tensor, seed: int, training: TrainingOptions,
                   batch_size: int, progress_bar: bool, test_sigma: Optional[float] = None,
                   test_keys: Optional[np.ndarray] = None, train_user=None,
                   device: Optional[torch.device] = None) -> list[int]:
    """Rounds of ``world * models_per_batch`` models: each rank trains its share, rank 0 stores all.

    With ``training_sets.shared`` every rank sets up every model's training set of the round, in the same
    order (a wrapper like DiffusionPurifiedDataModule then shares each draw's purification over the
    ranks), and reads only its own; otherwise each rank sets up only its own models' sets. With
    ``test_sigma`` (RAB) each model votes on its own noised test inputs, keyed by ``test_keys``. Each
    model's batches go through its wrapper's ``train_batch_transform``. With ``train_user`` (a user's
    LightningModule, one model per rank and round) ``train_user(i, training set, batch transform)`` trains model
    i and returns its votes. Returns the models trained, in order (the same on every rank).
    """
    world, rank = collective.world_size, collective.rank
    device = collective.device if device is None else device
    per_round = world * models_per_batch
    bar = tqdm(total=len(todo), desc="certify: models", unit="model", disable=not progress_bar)
    for start in range(0, len(todo), per_round):
        chunk = todo[start : start + per_round]
        mine = chunk[rank * models_per_batch : (rank + 1) * models_per_batch]
        sets = {i: training_sets.set_up(i) for i in (chunk if training_sets.shared else mine)}
        votes = {}
        if mine and train_user is not None:
            votes = {i: train_user(i, *sets[i]).numpy() for i in mine}
        elif mine:
            group = train_and_vote(
                [build(i) for i in mine], mine, [training_sets.tensors(sets[i][0]) for i in mine], test_images,
                seed=seed, max_epochs=training.max_epochs, batch_size=batch_size,
                limit_train_batches=training.limit_train_batches, device=device, together=len(mine) > 1,
                test_sigma=test_sigma, test_keys=test_keys, batch_transforms=[sets[i][1] for i in mine],
            )
            votes = dict(zip(mine, group.numpy()))
        gathered = collective.gather(votes)
        if rank == 0:
            for part in gathered:
                for i, model_votes in part.items():
                    store.save(i, model_votes)
        bar.update(len(chunk))
    bar.close()
    return list(todo)


# --------------------------------------------------------------------------- outputs


def _certify_and_write(collective: Collective, store: Optional[VoteStore], output_dir: Path, trained: list[int],
                       data: _Data, mode: str, num_models: int, n0: int, selection: str, alpha: float,
                       sigma: Optional[float], partition: Optional[Tensor], report_radii,
                       sigma_from: Optional[str] = None) -> CertificationResult:
    """Rank 0 certifies the test points once all models' votes are stored, and writes the outputs; every
    rank learns whether the run is complete."""
    result = CertificationResult(output_dir=output_dir, complete=False, trained=trained)
    if collective.rank == 0 and len(store.done(num_models)) == num_models:
        votes = store.load(list(range(num_models)))
        labels = data.test_labels.numpy()
        if mode in SMOOTHED_MODES:
            summary, files = _smoothing_outputs(output_dir, mode, votes, labels, data.test_indices, data.num_classes,
                                                n0, selection, alpha, sigma, report_radii, sigma_from)
        else:
            summary, files = _dpa_outputs(output_dir, votes, labels, data.test_indices, data.num_classes, partition,
                                          report_radii)
        result = CertificationResult(output_dir, True, trained, votes, summary, files)
    collective.barrier("certify: outputs")
    result.complete = collective.broadcast(result.complete, src=0)
    return result


def _vote_counts(votes: np.ndarray, num_classes: int) -> np.ndarray:
    """(M, T) votes -> (T, K) counts."""
    return (votes[:, :, None] == np.arange(num_classes)).sum(axis=0).astype(np.int64)


def _write_csv(path: Path, header: Sequence[str], rows) -> Path:
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    return atomic_write(path, text.getvalue())


def _write_summary(output_dir: Path, summary: dict) -> Path:
    return atomic_write(output_dir / SUMMARY_JSON, json.dumps(canonical(summary), indent=2))


def _curve(output_dir: Path, header: Sequence[str], rows, curves: dict, title: str, **plot) -> dict:
    csv_path = _write_csv(output_dir / CURVE_CSV, header, rows)
    png = plot_certified_accuracy(curves, output_dir / CURVE_PNG, title=title, **plot)
    return {"curve_csv": csv_path, "curve_png": png}


def _smoothing_outputs(output_dir, mode, votes, labels, indices, num_classes, n0, selection, alpha, sigma,
                       report_radii, sigma_from=None):
    """CERTIFY (Hong et al.'s smoothing) or RAB's certificate from the votes, and the output files."""
    m = votes.shape[0]
    if selection == "split":
        counts0, counts = _vote_counts(votes[:n0], num_classes), _vote_counts(votes[n0:], num_classes)
    else:
        counts0 = counts = _vote_counts(votes, num_classes)
    n = int(counts[0].sum())
    certify_fn = certify_rab_batch if mode == "rab" else certify_batch
    cert = certify_fn(counts0, counts, sigma, alpha)
    unanimous = np.zeros((1, num_classes), dtype=np.int64)
    unanimous[0, 0] = n
    max_radius = float(certify_fn(unanimous, unanimous, sigma, alpha).radius[0])  # all n votes agree
    correct = cert.prediction == labels
    bounds = [("pA", cert.p_a)] + ([("pB", cert.p_b)] if mode == "rab" else [])
    files = {"certificates": _write_csv(
        output_dir / CERTIFICATES_CSV,
        ["index", "label", "prediction", *(name for name, _ in bounds), "radius", "correct"],
        zip(indices.tolist(), labels.tolist(), cert.prediction.tolist(), *(b.tolist() for _, b in bounds),
            cert.radius.tolist(), correct.astype(int).tolist()),
    )}
    top = max(max_radius, float(cert.radius.max()), max(report_radii, default=0.0)) * 1.05 or sigma
    grid = np.unique(np.concatenate([np.linspace(0.0, top, 201), np.asarray(report_radii, dtype=float)]))
    accuracy = certified_accuracy(cert.radius, correct, grid)
    name = "RAB" if mode == "rab" else "Hong et al."
    files.update(_curve(output_dir, ["radius", "certified_accuracy"],
                        ((float(r), float(a)) for r, a in zip(grid, accuracy)), {f"sigma={sigma:g}": (grid, accuracy)},
                        f"{name}: m={m}, n0={n0 if selection == 'split' else m}, n={n}, alpha={alpha:g}",
                        xlabel=RADIUS_XLABEL[mode]))
    majority = _vote_counts(votes, num_classes).argmax(axis=1)
    summary = {
        "mode": mode, "certifies": CERTIFIES[mode], "sigma": sigma, "sigma_from": sigma_from, "num_models": m,
        "n0": n0 if selection == "split" else m, "n": n, "selection": selection, "alpha": alpha,
        "num_test_points": len(labels),
        "certified_accuracy": {f"{r:g}": float(certified_accuracy(cert.radius, correct, [r])[0]) for r in report_radii},
        "abstain_rate": float(np.mean(cert.prediction == ABSTAIN)),
        "smoothed_accuracy": float(np.mean(majority == labels)),
        "mean_model_accuracy": float(np.mean(votes == labels[None, :])),
        "max_certifiable_radius": max_radius,
    }
    files["summary"] = _write_summary(output_dir, summary)
    return summary, files


def _dpa_outputs(output_dir, votes, labels, indices, num_classes, partition, report_radii):
    """DPA's plurality vote and certificate, in insertions plus deletions and in modified samples."""
    k = votes.shape[0]
    prediction, size = dpa_certificate_batch(torch.from_numpy(votes.T.copy()), num_classes)
    modified = certified_modified_samples(size).numpy()
    prediction, size = prediction.numpy(), size.numpy()
    correct = prediction == labels
    files = {"certificates": _write_csv(
        output_dir / CERTIFICATES_CSV,
        ["index", "label", "prediction", "certified_insertions_deletions", "certified_modified_samples", "correct"],
        zip(indices.tolist(), labels.tolist(), prediction.tolist(), size.tolist(), modified.tolist(),
            correct.astype(int).tolist()),
    )}
    # Certified accuracy at r modified samples is certified accuracy at 2r insertions plus deletions.
    grid = np.arange(0, int(modified.max()) + 2)
    accuracy = certified_accuracy(modified, correct, grid)
    files.update(_curve(output_dir, DPA_CURVE_HEADER, ((int(r), 2 * int(r), float(a)) for r, a in zip(grid, accuracy)),
                        {f"DPA k={k}": (grid, accuracy)}, f"DPA, k={k} partitions", xlabel=DPA_XLABEL, steps=True,
                        secondary_xaxis=(DPA_TOP_XLABEL, 2.0)))
    sizes = np.bincount(partition.numpy(), minlength=k)
    summary = {
        "mode": "dpa", "certifies": CERTIFIES["dpa"], "num_partitions": k, "num_test_points": len(labels),
        "partition_sizes": {"min": int(sizes.min()), "max": int(sizes.max())},
        "certified_accuracy_insertions_deletions": {f"{int(s)}": float(np.mean(correct & (size >= s)))
                                                    for s in report_radii},
        "certified_accuracy_modified_samples": {f"{int(s)}": float(np.mean(correct & (modified >= s)))
                                                for s in report_radii},
        "median_certified_insertions_deletions": median_certified_size(size, correct),
        "median_certified_modified_samples": median_certified_size(modified, correct),
        "smoothed_accuracy": float(np.mean(correct)),
        "mean_model_accuracy": float(np.mean(votes == labels[None, :])),
    }
    files["summary"] = _write_summary(output_dir, summary)
    return summary, files


def plot_runs(run_dirs: Sequence[Union[str, os.PathLike]], path: Union[str, os.PathLike],
              labels: Optional[Sequence[str]] = None, title: Optional[str] = None) -> Path:
    """One certified-accuracy plot of several runs (e.g. a sigma grid), as Hong et al.'s Figure 1.

    Runs of the smoothing and RAB modes (l2 radii) plot together; DPA runs (modified samples, with
    insertions plus deletions on the top axis) plot only with DPA runs.

    Args:
        run_dirs: Output directories of :func:`run_certification`.
        path: The PNG to write.
        labels: One label per run (default: each run's sigma or k, or its directory name).
        title: Optional title.

    Raises:
        ValueError: If a directory holds no ``certified_accuracy.csv`` (or one of an older layout), labels do
            not match, or DPA runs are mixed with radius runs.
    """
    if not run_dirs:
        raise ValueError("run_dirs must name at least one certification output directory")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"labels must give one label per run directory: {len(labels)} labels, {len(run_dirs)} dirs")
    curves, kinds = {}, {}
    for n, run in enumerate(run_dirs):
        run = Path(run)
        curve = run / CURVE_CSV
        if not curve.exists():
            raise ValueError(f"{run} holds no {CURVE_CSV}: is it a finished `lightning-defense certify` output_dir?")
        with open(curve, newline="") as f:
            rows = list(csv.reader(f))
        header, values = rows[0], np.asarray(rows[1:], dtype=float)
        summary = json.loads((run / SUMMARY_JSON).read_text()) if (run / SUMMARY_JSON).exists() else {}
        if header == DPA_CURVE_HEADER:
            kinds[run] = "dpa"
        elif header == ["radius", "certified_accuracy"]:
            kinds[run] = summary.get("mode", "smoothing")
        else:
            raise ValueError(
                f"{curve} has columns {header}, not those of this version ({DPA_CURVE_HEADER} for DPA, "
                "['radius', 'certified_accuracy'] otherwise); rerun `lightning-defense certify` with that run's "
                "config and output_dir to rewrite its outputs (the stored votes are reused, nothing is retrained)")
        if labels is not None:
            label = labels[n]
        elif "sigma" in summary:
            label = f"{'RAB ' if kinds[run] == 'rab' else ''}sigma={summary['sigma']:g}"
        elif "num_partitions" in summary:
            label = f"DPA k={summary['num_partitions']}"
        else:
            label = run.name
        curves[label] = (values[:, 0], values[:, -1])
    found = set(kinds.values())
    if "dpa" in found:
        if found != {"dpa"}:
            raise ValueError("DPA runs (certified modified samples) and radius runs (l2) cannot share an x-axis; got "
                             + ", ".join(f"{run} ({kind})" for run, kind in kinds.items()))
        return plot_certified_accuracy(curves, path, title=title, xlabel=DPA_XLABEL, steps=True,
                                       secondary_xaxis=(DPA_TOP_XLABEL, 2.0))
    xlabel = RADIUS_XLABEL[found.pop()] if len(found) == 1 else (
        "radius (l2 over the whole training set; RAB runs: also over the test input)")
    return plot_certified_accuracy(curves, path, title=title, xlabel=xlabel)

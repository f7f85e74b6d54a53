"""Training the certification loop's models: one at a time, or several at once with ``torch.func``.

Each model follows its class's recipe, one of :data:`RECIPES`: :class:`~lightning_defense.models.ImageClassifier`'s
(random crop/flip in pixel space, normalisation, cross-entropy, SGD with Nesterov momentum and weight decay,
x``gamma`` steps at the milestones) or :class:`~lightning_defense.models.FastImageClassifier`'s (also a whitening
stem from each model's first batch, label smoothing, lookahead, a per-step schedule and test-time augmentation),
in a plain loop on one device, so that no process group is nested inside the
loop's own DDP sharding. All randomness of model ``i`` (initialisation, shuffling, augmentation) comes
from streams keyed by ``(seed, i)``: a model's votes depend neither on the rank that trains it nor on
the other models of its group. A smoothing wrapper's per-batch rewrite (``train_batch_transform``,
e.g. ECLIPSE's compensation) applies to every batch before the crop/flip, as in ``fit``, drawing from the
CPU stream keyed by ``(seed, i, BATCH_TRANSFORM)``.

Several models train at once as one network. For the backbones :mod:`~lightning_defense.models.grouped`
knows, their layers are stacked along the channels (grouped convolutions, ``G`` times the norm channels, a
batched linear head), which keeps every activation contiguous; for any other architecture their weights
are stacked (``torch.func.stack_module_state``) and the shared architecture is called through
``vmap(functional_call)``. BatchNorm works both ways: each model's statistics are its own channels (or
stacked buffers that ``vmap`` updates in place per model), so a group computes, up to floating-point
rounding, the same updates as training the models one by one. SGD and lookahead are elementwise per parameter,
so one optimizer over the stacked tensors is the per-model optimizer. The crop/flip offsets of each model are
drawn from its own stream and applied to the whole group at once.

For RAB (Weber et al.) each model also votes on noised test inputs: model ``i`` sees test point ``t``
(its index in the test split) as ``x_t + sigma * N(0, I)``, the normal draw keyed by
``(seed, i, TEST_NOISE)`` and ``t`` through :func:`~lightning_defense.core.rng.per_sample_normal`, so
its votes do not depend on the group, the rank, or which other test points are certified.

A user's own ``LightningModule`` (:func:`build_user_model`, :func:`train_user_and_vote`) trains one at a
time by its own ``training_step`` and ``configure_optimizers``, on batches of its own form from a loader
like its own training loader (:func:`user_loader`), in the same plain loop; it votes with the argmax of
``module(x)`` on the test points given in its own input space. Its streams are keyed as above: INIT for
the construction, SHUFFLE for the order, AUGMENT for the global RNG its dataset transform and layers draw
from (with loader workers, their seeds come from the SHUFFLE generator).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import lightning as L

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap
from torch.utils.data import DataLoader, Dataset

from lightning_defense.models.augment import apply_crop_flip, draw_crop_flip
from lightning_defense.models.grouped import can_stack, stack_layers
from lightning_defense.core.pixels import Layout, PixelSpace
from lightning_defense.core.rng import generator, per_sample_normal, seed_for
from lightning_defense.models.classifier import ImageClassifier
from lightning_defense.models.fast import FastImageClassifier

__all__ = ["RECIPES", "BatchTransform", "build_model", "build_user_model", "rab_test_noise", "train_and_vote",
           "train_user_and_vote", "user_loader"]

# Independent random streams of one model, keyed by (seed, model index, stream).
INIT, SHUFFLE, AUGMENT, TEST_NOISE, BATCH_TRANSFORM = 0, 1, 2, 3, 4

BatchTransform = Callable[[Tensor, torch.Generator], Tensor]
"""``(images, generator) -> images``: a wrapper's ``train_batch_transform``."""


#: The library's models that the loop trains itself (:func:`train_and_vote`), several at once: each gives its recipe
#: through ``criterion``, ``optimizer_and_schedule``, ``initialise_from_batch`` and ``eval_logits``.
RECIPES = (ImageClassifier, FastImageClassifier)


def build_model(recipe: tuple[type, dict], num_classes: int, in_chans: int, seed: int, index: int) -> ImageClassifier:
    """A fresh model ``cls(**init_args)`` of ``recipe = (cls, init_args)`` (one of :data:`RECIPES`) for model
    ``index``, initialised from its own stream."""
    cls, init_args = recipe
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_for(seed, index, INIT))
        return cls(**init_args, num_classes=num_classes, in_chans=in_chans)


def rab_test_noise(seed: int, index: int, test_keys: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Model ``index``'s standard normal test-time noise (RAB) for the test points ``test_keys``, (T, *shape)."""
    return per_sample_normal(seed_for(seed, index, TEST_NOISE), torch.as_tensor(test_keys), tuple(shape))


def train_and_vote(
    models: Sequence[ImageClassifier],
    indices: Sequence[int],
    train_data: Sequence[tuple[Tensor, Tensor]],
    test_images: Tensor,
    *,
    seed: int,
    max_epochs: int,
    batch_size: int,
    limit_train_batches: Optional[int],
    device: torch.device,
    together: bool,
    stacking: str = "auto",
    eval_batch_size: int = 1024,
    test_sigma: Optional[float] = None,
    test_keys: Optional[Sequence[int]] = None,
    batch_transforms: Optional[Sequence[Optional[BatchTransform]]] = None,
) -> Tensor:
    """Trains a group of models on their training sets and returns their votes on ``test_images``.

    Args:
        models: Freshly built models (see :func:`build_model`), one architecture.
        indices: The models' indices in the run (they key the shuffling and augmentation streams).
        train_data: One ``(images in [0, 1], labels)`` pair per model, on the CPU.
        test_images: (T, C, H, W) test points in [0, 1].
        seed: The run's seed.
        max_epochs: Epochs per model.
        batch_size: Training batch size; a last batch of one image joins the batch before it.
        limit_train_batches: At most this many batches per epoch (None: all).
        device: Where to train.
        together: Train the group at once as one network; every training set must have the same size.
        stacking: How a group trains at once: ``"layers"`` (layers stacked along the channels, see
            :mod:`~lightning_defense.models.grouped`), ``"vmap"`` (``torch.func.vmap`` over stacked weights), or
            ``"auto"``: layers where the backbone allows it, else vmap.
        eval_batch_size: Test points per forward pass.
        test_sigma: RAB's test-time noise: each model votes on ``x + test_sigma * rab_test_noise(seed, i,
            test_keys, ...)`` (not clipped, as RAB's certificate assumes). None: on the test points as they are.
        test_keys: With ``test_sigma``: each test point's index in the test split, shape (T,).
        batch_transforms: One per model, or None: its wrapper's ``train_batch_transform``, applied to each of
            its batches on ``device`` before the crop/flip, with the CPU generator keyed by
            ``(seed, i, BATCH_TRANSFORM)`` (one stream per model, drawn batch after batch).

    Returns:
        LongTensor (G, T): each model's argmax prediction on each test point, on the CPU.
    """
    group = len(models)
    if test_sigma is not None:
        if not test_sigma > 0:
            raise ValueError(f"test_sigma must be > 0 (test-time noise std in [0,1] pixel units); got {test_sigma}")
        if test_keys is None or len(test_keys) != len(test_images):
            raise ValueError("test_sigma needs test_keys: one test-split index per test point, "
                             f"{len(test_images)} here; got {None if test_keys is None else len(test_keys)}")
        test_keys = torch.as_tensor(np.asarray(test_keys), dtype=torch.long)
    if not together and group != 1:
        raise ValueError(f"without together=True, train one model at a time; got {group} models")
    if stacking not in ("auto", "layers", "vmap"):
        raise ValueError(f"stacking must be 'auto', 'layers' or 'vmap'; got {stacking!r}")
    sizes = {len(images) for images, _ in train_data}
    if together and len(sizes) != 1:
        raise ValueError(f"models trained together need training sets of one size; got sizes {sorted(sizes)}")
    if batch_transforms is None:
        batch_transforms = [None] * group
    if len(batch_transforms) != group:
        raise ValueError(f"batch_transforms must give one entry per model ({group}); got {len(batch_transforms)}")
    hp = models[0].hparams
    models = [m.to(device).train() for m in models]
    shuffle_gens = [generator(seed, i, SHUFFLE) for i in indices]
    augment_gens = [generator(seed, i, AUGMENT, device=device) for i in indices]
    transform_gens = [generator(seed, i, BATCH_TRANSFORM) for i in indices]
    n = len(train_data[0][0])
    # Batch boundaries. A last batch of one image joins the batch before it: alone it would give BatchNorm one value
    # per channel where a network pools to 1x1 (airbench94's at 8x8 or 14x14), which cannot train; DPA's
    # partitions take every size.
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    steps = len(bounds) - 1
    if limit_train_batches is not None:
        steps = min(steps, limit_train_batches)

    def batches():
        """``(step, xs, draws, ys)``: each model's batch (after its batch transform) and crop/flip draws."""
        for _ in range(max_epochs):
            orders = [torch.randperm(len(images), generator=g) for (images, _), g in zip(train_data, shuffle_gens)]
            for step in range(steps):
                xs, ys, draws = [], [], []
                for (images, labels), order, gen, transform, transform_gen in zip(
                        train_data, orders, augment_gens, batch_transforms, transform_gens):
                    idx = order[bounds[step] : bounds[step + 1]]
                    x = images[idx].to(device, non_blocking=True)
                    if transform is not None:
                        x = transform(x, transform_gen)
                    xs.append(x)
                    draws.append(draw_crop_flip(len(x), hp.crop_padding, hp.flip, gen, x.device))
                    ys.append(labels[idx].to(device, non_blocking=True))
                yield step, xs, draws, ys

    # Each model's data-dependent initialisation (the fast recipe's whitening) from its first batch, before stacking
    stream = batches()
    first = next(stream)
    for model, x in zip(models, first[1]):
        model.initialise_from_batch(x)

    if together and stacking == "auto":
        stacking = "layers" if can_stack(models[0].backbone) else "vmap"
    if together and stacking == "layers":
        if any(not (torch.equal(m.mean, models[0].mean) and torch.equal(m.std, models[0].std)) for m in models):
            raise ValueError("stacking='layers' needs one normalisation (mean, std) for every model of the group")
        network = stack_layers([m.backbone for m in models]).to(device, memory_format=torch.channels_last).train()

        def grouped(x: Tensor) -> Tensor:  # (G, B, C, H, W) pixels -> (G, B, K) logits
            g, b = x.shape[:2]
            stacked = models[0].normalize(x).transpose(0, 1).reshape(b, -1, *x.shape[3:])  # (B, G * C, H, W)
            logits = network(stacked.contiguous(memory_format=torch.channels_last))
            return logits.view(b, g, -1).transpose(0, 1)

        trainable, modules = dict(network.named_parameters()), dict(network.named_modules())
    elif together:
        params, buffers = stack_module_state(models)
        template = copy.deepcopy(models[0]).to("meta")

        def call(p, b, x):
            return functional_call(template, (p, b), (x,))

        def grouped(x: Tensor) -> Tensor:
            return vmap(call)(params, buffers, x)

        trainable, modules = params, dict(template.named_modules())
    else:
        trainable, modules = dict(models[0].named_parameters()), None

    # The model's own recipe (ImageClassifier's SGD and steps, or the fast recipe's) over the stacked parameters
    optimizer, scheduler, interval = models[0].optimizer_and_schedule(max_epochs, max_epochs * steps, trainable, modules)
    for step, xs, draws, ys in itertools.chain([first], stream):
        x = torch.stack(xs)  # (G, B, C, H, W), each model's crop/flip drawn from its own stream
        x = apply_crop_flip(x.flatten(0, 1), hp.crop_padding,
                            *(None if d[0] is None else torch.cat(d) for d in zip(*draws))).view(x.shape)
        if together:
            per_sample = models[0].criterion(grouped(x).flatten(0, 1), torch.stack(ys).flatten(), reduction="none")
            loss = per_sample.view(group, -1).mean(dim=1).sum()  # each model's gradient is its own mean loss's
        else:
            loss = models[0].criterion(models[0](x[0]), ys[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if interval == "step" or step == steps - 1:
            scheduler.step()

    votes = []
    with torch.no_grad():
        for start in range(0, len(test_images), eval_batch_size):
            x = test_images[start : start + eval_batch_size]
            if test_sigma is not None:  # (G, B, C, H, W): each model's own noised copy
                keys = test_keys[start : start + eval_batch_size]
                x = torch.stack([x + test_sigma * rab_test_noise(seed, i, keys, tuple(x.shape[1:])).to(x.dtype)
                                 for i in indices])
            x = x.to(device)
            if together and stacking == "layers":
                network.eval()
                logits = models[0].eval_logits(grouped, x if test_sigma is not None else x.expand(group, *x.shape))
            elif together:
                template.eval()
                logits = vmap(call, in_dims=(0, 0, 0 if test_sigma is not None else None))(params, buffers, x)
            else:
                models[0].eval()
                logits = models[0](x[0] if test_sigma is not None else x)[None]
            votes.append(logits.argmax(dim=-1).cpu())
    return torch.cat(votes, dim=1)


# --------------------------------------------------------------------------- a user's own LightningModule


def build_user_model(cls: type, init_args: Mapping, seed: int, index: int) -> L.LightningModule:
    """``cls(**init_args)``, a user's LightningModule class, for model ``index``, initialised from its own stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_for(seed, index, INIT))
        return cls(**init_args)


def user_loader(template: DataLoader, dataset: Dataset, seed: int, index: int) -> DataLoader:
    """A loader like the user's training loader ``template`` (its batch size, collate, drop_last, workers) over
    ``dataset``, shuffled by model ``index``'s SHUFFLE stream.

    Raises:
        ValueError: ``template`` has no batch size (a custom batch sampler).
    """
    if template.batch_size is None:
        raise ValueError(f"the training loader has no batch_size (batch_sampler={template.batch_sampler!r}); the "
                         "certification loop rebuilds it over each model's training set and needs "
                         "DataLoader(dataset, batch_size=..., ...)")
    workers = template.num_workers
    return DataLoader(dataset, batch_size=template.batch_size, shuffle=True, generator=generator(seed, index, SHUFFLE),
                      collate_fn=template.collate_fn, drop_last=template.drop_last, num_workers=workers,
                      worker_init_fn=template.worker_init_fn, pin_memory=template.pin_memory,
                      multiprocessing_context=template.multiprocessing_context)


def pixel_batch_transform(transform: BatchTransform, layout: Layout,
                          space: PixelSpace) -> Callable[[Any, torch.Generator], Any]:
    """A wrapper's ``train_batch_transform`` (on [0, 1] pixels) applied to a batch of the user's form."""

    def apply(batch: Any, gen: torch.Generator) -> Any:
        images, _, _ = layout.split(batch)
        return layout.with_image(batch, space.from_pixels(transform(space.to_pixels(images), gen)))

    return apply


def _optimizer_and_schedulers(module: L.LightningModule) -> tuple[torch.optim.Optimizer, list[tuple[Any, str]]]:
    """``module.configure_optimizers()`` read as Lightning reads it, for one optimizer: ``(optimizer, [(scheduler,
    interval)])``. Forms: an optimizer, ``[optimizer]``, ``([optimizer], [schedulers])``, ``{"optimizer": ...,
    "lr_scheduler": scheduler or {"scheduler": ..., "interval": "epoch" | "step"}}`` or a one-element list of it."""
    conf = module.configure_optimizers()
    name = type(module).__name__
    schedulers: list = []
    if isinstance(conf, (list, tuple)) and len(conf) == 1:
        conf = conf[0]
    if isinstance(conf, Mapping):
        optimizers = [conf.get("optimizer")]
        schedulers = [conf["lr_scheduler"]] if conf.get("lr_scheduler") is not None else []
    elif isinstance(conf, (list, tuple)) and len(conf) == 2 and isinstance(conf[0], (list, tuple)):
        optimizers, schedulers = list(conf[0]), (list(conf[1]) if isinstance(conf[1], (list, tuple)) else [conf[1]])
    else:
        optimizers = list(conf) if isinstance(conf, (list, tuple)) else [conf]
    if len(optimizers) != 1 or not isinstance(optimizers[0], torch.optim.Optimizer):
        raise ValueError(f"{name}.configure_optimizers() must give one torch optimizer (alone, in a list, or as "
                         f"{{'optimizer': ..., 'lr_scheduler': ...}}) for the certification loop; got {conf!r}")
    steps = []
    for entry in schedulers:
        scheduler = entry.get("scheduler") if isinstance(entry, Mapping) else entry
        interval = entry.get("interval", "epoch") if isinstance(entry, Mapping) else "epoch"
        if interval not in ("epoch", "step") or isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise ValueError(f"{name}.configure_optimizers(): the certification loop steps schedulers per epoch or "
                             f"per step (no monitored metric); got {entry!r}")
        steps.append((scheduler, interval))
    return optimizers[0], steps


def train_user_and_vote(
    module: L.LightningModule,
    index: int,
    loader: DataLoader,
    test_pixels: Tensor,
    space: PixelSpace,
    num_classes: int,
    *,
    seed: int,
    max_epochs: int,
    limit_train_batches: Optional[int],
    device: torch.device,
    eval_batch_size: int = 1024,
    test_sigma: Optional[float] = None,
    test_keys: Optional[Sequence[int]] = None,
    batch_transform: Optional[Callable[[Any, torch.Generator], Any]] = None,
) -> Tensor:
    """Trains a user's LightningModule by its own ``training_step`` and ``configure_optimizers`` and returns its
    votes, the argmax of ``module(space.from_pixels(p))`` on the test pixels ``p``.

    No Trainer is attached (``self.log`` is a no-op, as Lightning allows); the module's other hooks are not
    called. Only automatic optimization with one optimizer is supported; schedulers step per epoch (or per
    step, with ``"interval": "step"``).

    Args:
        module: Built by :func:`build_user_model`.
        index: The model's index (keys its AUGMENT, BATCH_TRANSFORM and TEST_NOISE streams).
        loader: Its training batches, in the user's form (see :func:`user_loader`).
        test_pixels: (T, C, H, W) test points in [0, 1] pixels.
        space: The user's input space: the module sees ``space.from_pixels`` of the test pixels.
        num_classes: The classes a vote may name; the module must give that many scores.
        batch_transform: ``(batch, generator) -> batch``, a wrapper's per-batch rewrite (see
            :func:`pixel_batch_transform`), drawing from the CPU stream keyed by ``(seed, index, BATCH_TRANSFORM)``.
        Others: As :func:`train_and_vote`.

    Returns:
        LongTensor (T,): the module's prediction on each test point, on the CPU.

    Raises:
        ValueError: Manual optimization, an optimizer configuration it cannot run, or scores that are not (B,
            num_classes).
    """
    name = type(module).__name__
    if not module.automatic_optimization:
        raise ValueError(f"{name} uses manual optimization (automatic_optimization=False), which needs a Trainer; "
                         "the certification loop runs training_step with automatic optimization only")
    transform_gen = generator(seed, index, BATCH_TRANSFORM)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*trainer.*")  # no Trainer: self.log does nothing
        torch.manual_seed(seed_for(seed, index, AUGMENT))
        module = module.to(device).train()
        optimizer, schedulers = _optimizer_and_schedulers(module)
        for _ in range(max_epochs):
            for batch_idx, batch in enumerate(loader):
                if limit_train_batches is not None and batch_idx >= limit_train_batches:
                    break
                batch = module.transfer_batch_to_device(batch, device, 0)
                if batch_transform is not None:
                    batch = batch_transform(batch, transform_gen)
                out = module.training_step(batch, batch_idx)
                loss = out.get("loss") if isinstance(out, Mapping) else out
                if loss is None:  # Lightning skips the step
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for scheduler, interval in schedulers:
                    if interval == "step":
                        scheduler.step()
            for scheduler, interval in schedulers:
                if interval == "epoch":
                    scheduler.step()

        module.eval()
        votes = []
        with torch.no_grad():
            for start in range(0, len(test_pixels), eval_batch_size):
                x = test_pixels[start : start + eval_batch_size]
                if test_sigma is not None:
                    keys = torch.as_tensor(np.asarray(test_keys[start : start + eval_batch_size]), dtype=torch.long)
                    x = x + test_sigma * rab_test_noise(seed, index, keys, tuple(x.shape[1:])).to(x.dtype)
                scores = module(space.from_pixels(x).to(device))
                if not isinstance(scores, Tensor) or scores.ndim != 2 or scores.shape[1] != num_classes:
                    shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
                    raise ValueError(f"{name}(x) must give (batch, num_classes={num_classes}) class scores to vote "
                                     f"with; got {shape}. Set num_classes if the data's labels do not show every class")
                votes.append(scores.argmax(dim=1).cpu())
    return torch.cat(votes)

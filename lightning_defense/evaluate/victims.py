"""Victims of the evaluation protocol: trained fresh per (attack, defense, trial), scored by attack success.

Under DDP each rank trains on its share of every 1-process batch (:func:`shard_loader`), cut at the one
seam where the strategy processes each loader (:class:`~lightning_defense.core.seam.TrainingDataSeam`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from lightning_defense.attacks.base import apply_trigger
from lightning_defense.attacks.metrics import AttackSuccessRate
from lightning_defense.callbacks.linear_probe import LinearProbe
from lightning_defense.core.batch import dataset_tensors
from lightning_defense.core.collective import Collective
from lightning_defense.core.config import instantiate
from lightning_defense.core.seam import SHARD, TrainingDataSeam, rebuild_loader
from lightning_defense.datamodules.poison import PoisonSet
from lightning_defense.datamodules.poisoned import PoisonedDataModule
from lightning_defense.evaluate.config import Defense, EvaluationConfig, Victim
from lightning_defense.models.classifier import ImageClassifier


class _RankBatches(Sampler):
    """Rank ``rank``'s share of every batch of ``batch_sampler`` (a strided slice; never empty).

    ``sampler`` is the wrapped batch sampler's sampler: Lightning calls ``set_epoch`` on
    ``loader.batch_sampler.sampler`` when an epoch starts, so the shards shuffle in the fit's epoch order
    (as the 1-process loader does).
    """

    def __init__(self, batch_sampler, rank: int, world_size: int) -> None:
        self.batch_sampler, self.rank, self.world_size = batch_sampler, rank, world_size
        self.sampler = getattr(batch_sampler, "sampler", None)

    def __iter__(self):
        for batch in self.batch_sampler:
            batch = list(batch)
            share = batch[self.rank::self.world_size]
            yield share if share else batch[-1:]

    def __len__(self) -> int:
        return len(self.batch_sampler)


def shard_loader(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """The loader one of ``world_size`` DDP processes uses so that together they see ``loader``'s batches.

    Every rank draws the same global batches as one process would (same sampler, same seed) and keeps
    every ``world_size``-th sample of each. DDP averages the ranks' gradients, so a step equals the
    1-process step when the shares are equally large; test metrics reduced over ranks count every sample
    once. A final batch smaller than ``world_size`` is repeated on the ranks left without a sample.
    """
    if world_size <= 1:
        return loader
    if isinstance(loader.dataset, IterableDataset) or loader.batch_sampler is None:
        raise ValueError(f"evaluate under DDP needs map-style datasets with a batch_size; got a loader over "
                         f"{type(loader.dataset).__name__} (set trainer.use_distributed_sampler: true to use "
                         "Lightning's DistributedSampler instead)")
    return rebuild_loader(loader, batch_sampler=_RankBatches(loader.batch_sampler, rank, world_size))


def shard_loaders(trainer: L.Trainer) -> None:
    """Make every loader ``trainer`` runs a rank shard (see :func:`shard_loader`).

    The shards are cut at the training-data seam, last (``SHARD``), so loaders that callbacks swap in
    during fit (``WarmStart``'s purified data) are sharded too. A loader whose sampler already splits by
    rank (``DistributedSampler``, Opacus' distributed Poisson sampler) is left as it is.
    """

    def transform(loader, is_train: bool):
        samplers = (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None))
        if not isinstance(loader, DataLoader) or any(hasattr(s, "num_replicas") for s in samplers):
            return loader
        return shard_loader(loader, trainer.global_rank, trainer.world_size)

    TrainingDataSeam.of(trainer).add("evaluate-shard", transform, SHARD)


def train_victim(config: EvaluationConfig, defense: Defense, poisons: Optional[PoisonSet], seed: int, root: Path,
                 victim: Optional[Victim] = None, extractor: Optional[str] = None):
    """Train a fresh victim with ``defense`` on the (poisoned) data; returns ``(model, datamodule, test accuracy)``.

    ``victim`` overrides the global model/trainer and adds callbacks; with ``victim.transfer`` the model
    starts from the ``extractor`` file, frozen, and only its head is trained. Under DDP every rank ends
    with rank 0's weights (``model.trainer`` is the victim's trainer).
    """
    victim = victim or Victim()
    L.seed_everything(seed, workers=True, verbose=False)
    data = instantiate(config.data, L.LightningDataModule, "data")
    if poisons is not None:
        data = PoisonedDataModule(data, poisons)
    if defense.wrapper is not None:
        data = instantiate(defense.wrapper, L.LightningDataModule, f"defenses[{defense.name}].wrapper", base=data)
    callbacks = [LinearProbe(checkpoint_path=extractor)] if victim.transfer else []
    callbacks += [instantiate(c, L.Callback, "victim.callbacks") for c in victim.callbacks]
    callbacks += [instantiate(c, L.Callback, f"defenses[{defense.name}].callbacks") for c in defense.callbacks]
    model_args = {**config.model, **victim.model}
    model = ImageClassifier(**{**model_args, "num_classes": data.num_classes, "in_chans": data.num_channels})
    trainer_args = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root), use_distributed_sampler=False)
    trainer_args.update(config.trainer)
    trainer_args.update(victim.trainer)
    trainer = L.Trainer(**trainer_args, callbacks=callbacks)
    if not trainer_args["use_distributed_sampler"]:
        shard_loaders(trainer)
    trainer.fit(model, datamodule=data)
    Collective.of(trainer).share_rank_zero_weights(model)
    accuracy = float(trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"])
    return model.eval(), data, accuracy


def check_scorable(poisons: PoisonSet, num_classes: int, what: str) -> None:
    """Raise unless :func:`attack_success` can score ``poisons`` (checked before any victim trains).

    A targeted set needs ``target_images`` and ``adversarial_labels``; a backdoor set needs ``trigger``,
    ``source_class`` and ``target_class``, with the trigger fitting the images at ``metadata["trigger_xy"]``.
    Classes must be below ``num_classes``. ``what`` names the set (its file, or its attack) in the error.
    """
    if poisons.kind == "targeted":
        needed = {"target_images": poisons.target_images, "adversarial_labels": poisons.adversarial_labels}
        labels = poisons.adversarial_labels
        classes = {} if labels is None else {"adversarial_labels": labels.tolist()}
    elif poisons.kind == "backdoor":
        needed = {"trigger": poisons.trigger, "source_class": poisons.source_class, "target_class": poisons.target_class}
        classes = {name: [value] for name, value in needed.items() if name != "trigger" and value is not None}
    else:
        return
    missing = [name for name, value in needed.items() if value is None]
    if missing:
        raise ValueError(f"{what}: a {poisons.kind} PoisonSet needs {', '.join(needed)} to be scored, but has no "
                         f"{', '.join(missing)}; add them, or make it an indiscriminate set (scored by the accuracy "
                         f"drop) if it is an availability attack")
    for name, values in classes.items():
        if not all(0 <= v < num_classes for v in values):
            raise ValueError(f"{what}: {name} {values} must be classes in 0..{num_classes - 1}")
    if poisons.kind == "backdoor":
        try:
            apply_trigger(poisons.images[:0], poisons.trigger, poisons.metadata.get("trigger_xy"))
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from err


def attack_success(model: ImageClassifier, poisons: PoisonSet, test_set, clean_accuracy: float, accuracy: float) -> float:
    """Success of one trial: targeted / backdoor rate on the goal inputs, or the accuracy drop."""
    device = next(model.parameters()).device
    if poisons.kind == "indiscriminate":
        return clean_accuracy - accuracy
    metric = AttackSuccessRate(poisons.kind)
    with torch.no_grad():
        if poisons.kind == "targeted":
            if poisons.target_images is None or poisons.adversarial_labels is None:
                raise ValueError("a targeted PoisonSet needs target_images and adversarial_labels to be scored")
            metric.update(model(poisons.target_images.to(device)).cpu(), poisons.adversarial_labels.cpu())
        else:
            if poisons.trigger is None or poisons.source_class is None or poisons.target_class is None:
                raise ValueError("a backdoor PoisonSet needs trigger, source_class and target_class to be scored")
            images, labels = test_set.tensors() if hasattr(test_set, "tensors") else dataset_tensors(test_set)
            source = images[labels == poisons.source_class]
            triggered = apply_trigger(source, poisons.trigger, poisons.metadata.get("trigger_xy"))
            metric.update(model(triggered.to(device)).cpu(), torch.full((len(source),), poisons.target_class))
    return float(metric.compute())

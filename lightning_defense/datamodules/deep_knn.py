"""Deep k-NN filtering (Peri et al. 2020): drop training samples whose label disagrees with the
plurality label of their k nearest neighbours in a trained model's feature space.

Hong et al. (Table 4) report how many removed samples were poisons (TP) and how many were not (FP),
with k = 500 as in the original work.
"""

from __future__ import annotations

import warnings
from typing import Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import Dataset, Subset

from lightning_defense.core.batch import IndexedDataset, dataset_tensors
from lightning_defense.core.device import check_device, resolve_device
from lightning_defense.core.pixels import Normalization, PixelView
from lightning_defense.datamodules.wrapper import TrainSplitWrapper
from lightning_defense.models import ImageClassifier


def knn_disagreement(features: Tensor, labels: Tensor, k: int, num_classes: int, chunk: int = 1024) -> Tensor:
    """Boolean mask of samples whose label is not a plurality label among their k nearest neighbours.

    Distances are Euclidean; a sample is not its own neighbour. A sample whose label ties for the
    plurality is kept.
    """
    keep = torch.empty(len(features), dtype=torch.bool)
    for start in range(0, len(features), chunk):
        block = features[start : start + chunk]
        dist = torch.cdist(block, features)
        dist[torch.arange(len(block)), torch.arange(start, start + len(block))] = float("inf")
        neighbours = dist.topk(k, largest=False).indices
        votes = F.one_hot(labels[neighbours], num_classes).sum(1)
        own = votes.gather(1, labels[start : start + len(block), None]).squeeze(1)
        keep[start : start + len(block)] = own == votes.max(1).values
    return ~keep


@torch.no_grad()
def penultimate_features(model: L.LightningModule, images: Tensor, batch_size: int = 256) -> Tensor:
    """Features before the classifier head of an ``ImageClassifier``-style model (eval mode)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = model.normalize(images[start : start + batch_size].to(model.device))
        feats = model.backbone.forward_features(x)
        out.append((feats.mean((2, 3)) if feats.ndim == 4 else feats).flatten(1).cpu())
    return torch.cat(out)


class DeepKNNFilterDataModule(TrainSplitWrapper):
    """``base`` with label-inconsistent training samples removed (Deep k-NN, Peri et al.).

    The features come from ``feature_model``: a trained ``ImageClassifier``, or, when None, one trained
    here for ``epochs`` on the (possibly poisoned) training split, as a defender would.

    Args:
        base: The (possibly poisoned) datamodule. If it is a ``PoisonedDataModule``, the report counts
            true and false positives against its poison indices.
        k: Neighbours; 500 as in the original work, capped at N - 1.
        feature_model: A trained model with ``normalize`` and ``backbone.forward_features``.
        backbone: Backbone name for the model trained when ``feature_model`` is None.
        epochs: Epochs of that training.
        seed: Seed of that training (the training loader shuffles with ``base``'s seed, as ``fit`` would).
        normalization: ``(mean, std)`` of ``base``'s training images, when its transform and attributes do not say
            (see :class:`~lightning_defense.datamodules.wrapper.TrainSplitWrapper`).
        device: Where the feature model trains and embeds: ``auto`` (the attached Trainer's GPU, else a GPU,
            else the CPU), ``cpu``, ``cuda[:i]`` or ``mps`` (:func:`~lightning_defense.core.device.resolve_device`).

    After ``setup``, ``kept_indices`` maps the filtered split back to the base split and ``report``
    holds ``removed``, ``true_positives`` and ``false_positives``. On a user's datamodule the kept samples are
    the user's own items (its augmentation and normalisation), the features come from their [0, 1] pixels, and
    ``num_classes`` is ``base``'s, else ``max(label) + 1``.
    """

    def __init__(
        self,
        base: L.LightningDataModule,
        k: int = 500,
        feature_model: Optional[L.LightningModule] = None,
        backbone: str = "small_cnn",
        epochs: int = 10,
        seed: int = 0,
        normalization: Optional[Normalization] = None,
        device: str = "auto",
    ) -> None:
        super().__init__(base, normalization)
        check_device(device)
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1; got {epochs}")
        self.k = k
        self.feature_model = feature_model
        self.backbone = backbone
        self.epochs = epochs
        self.seed = seed
        self.device = device
        self.kept_indices: Optional[Tensor] = None
        self.report: dict[str, int] = {}

    def _train_feature_model(self, train_set: Dataset, num_classes: int, num_channels: int) -> L.LightningModule:
        L.seed_everything(self.seed, verbose=False)
        model = ImageClassifier(self.backbone, num_classes=num_classes, in_chans=num_channels, lr=0.05, flip=False)
        device = resolve_device(self.device, self.collective(), stage="deep_knn.feature_model")
        trainer = L.Trainer(
            max_epochs=self.epochs, accelerator=device.type, devices=[device.index or 0] if device.type == "cuda" else 1,
            logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        )
        with warnings.catch_warnings():  # the feature model is only trained here: no validation is intended
            warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no `val_dataloader`")
            trainer.fit(model, train_dataloaders=self._loader(train_set, shuffle=True))
        return model

    def wrap_train(self, train_set: Dataset) -> Dataset:
        images, labels = dataset_tensors(train_set)
        num_classes = self.num_classes or int(labels.max()) + 1
        model = self.feature_model or self._train_feature_model(
            train_set, num_classes, self.num_channels or images.shape[1])
        k = min(self.k, len(images) - 1)
        removed = knn_disagreement(penultimate_features(model, images), labels, k, num_classes)
        self.kept_indices = (~removed).nonzero().flatten()
        removed_idx = removed.nonzero().flatten()
        if not len(self.kept_indices):
            raise ValueError(
                f"Deep k-NN removed every one of the {len(images)} training samples (k={k}): no sample's label is a "
                "plurality label among its neighbours, so the feature model separates nothing (too few epochs, or "
                "labels that do not follow the images). Train the feature model longer (epochs=), lower k, or give a "
                "trained feature_model")
        self.report = {"k": k, "removed": len(removed_idx)}
        poison_set = getattr(self.base, "poison_set", None)
        if poison_set is not None:
            is_poison = torch.isin(removed_idx, poison_set.indices)
            self.report |= {"true_positives": int(is_poison.sum()), "false_positives": int((~is_poison).sum()),
                            "poisons": len(poison_set.indices)}
        rank_zero_info(f"Deep k-NN filter: {self.report}")
        return IndexedDataset(images[self.kept_indices], labels[self.kept_indices])

    def dressed(self, pixels: Dataset) -> Dataset:
        """The kept samples in ``base``'s form: a user's training set becomes its subset ``kept_indices``."""
        view = self.view
        if not view.native:
            space = view.space
            keys = {f"{what}_key": key for what, key in (("image", view.layout.image), ("label", view.layout.label))
                    if isinstance(key, str)}
            self.view = PixelView(Subset(view.dataset, self.kept_indices.tolist()),
                                  None if space.identity else (space.mean, space.std), owner=self.base, **keys)
        return super().dressed(pixels)

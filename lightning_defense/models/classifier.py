"""ImageClassifier: a LightningModule around any backbone, with the poisoning papers' recipe."""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_defense.core.batch import unpack_batch
from lightning_defense.core.collective import Collective
from lightning_defense.core.recipe import paper_milestones, sgd_with_steps
from lightning_defense.models.augment import augmentation_generator, random_crop_flip
from lightning_defense.models.backbones import build_backbone


class ImageClassifier(L.LightningModule):
    """Classifier that takes un-normalised [0,1] batches, augments, normalises, and classifies.

    Defaults follow the poisoning papers (FRIENDS, Hong et al.): SGD with Nesterov momentum 0.9,
    lr 0.1, weight decay 5e-4, and a x0.1 step schedule at 3/8, 5/8 and 7/8 of training.

    Args:
        backbone: A name (``small_cnn``, ``resnet18_cifar`` or any timm model) or an ``nn.Module``.
        num_classes: Number of classes (linked from the datamodule by the CLI).
        in_chans: Input channels (linked from the datamodule by the CLI).
        mean: Per-channel normalisation mean (a float is broadcast).
        std: Per-channel normalisation std.
        lr, momentum, nesterov, weight_decay: SGD settings.
        milestones: Epochs at which lr is multiplied by ``gamma``; None uses :func:`paper_milestones`.
        gamma: Step factor.
        crop_padding: Random-crop padding in pixels (0 disables cropping).
        flip: Random horizontal flips (off for digits, where a flip changes meaning).
        backbone_kwargs: Extra arguments for a named backbone.
        augment_seed: Seed of the crop/flip streams, keyed by ``(seed, epoch, batch index, rank)``; None
            draws one from the global RNG when training starts (so it follows ``seed_everything``), on rank 0
            for all ranks. The seed in use is saved in checkpoints and wins on resume, so a resumed fit
            augments as the uninterrupted one did.

    Example::

        model = ImageClassifier("small_cnn", num_classes=10, in_chans=1, flip=False)
        trainer = L.Trainer(max_epochs=5)
        trainer.fit(model, datamodule=DigitsDataModule())
    """

    def __init__(
        self,
        backbone: Union[str, nn.Module] = "small_cnn",
        num_classes: int = 10,
        in_chans: int = 3,
        mean: Union[float, Sequence[float]] = 0.5,
        std: Union[float, Sequence[float]] = 0.5,
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        milestones: Optional[list[int]] = None,
        gamma: float = 0.1,
        crop_padding: int = 4,
        flip: bool = True,
        backbone_kwargs: Optional[dict] = None,
        augment_seed: Optional[int] = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2; got {num_classes}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0; got {lr}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0; got {crop_padding}")
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        self.backbone = (
            backbone if isinstance(backbone, nn.Module) else build_backbone(backbone, num_classes, in_chans, **(backbone_kwargs or {}))
        )
        self.num_classes = num_classes
        self.register_buffer("mean", self._per_channel("mean", mean, in_chans))
        self.register_buffer("std", self._per_channel("std", std, in_chans))
        if (self.std <= 0).any():
            raise ValueError(f"std must be > 0; got {std}")
        # The training accuracy: correct predictions counted each step (_count_correct), averaged once an epoch
        self.train_acc = MeanMetric()
        self._train_correct: Union[int, Tensor] = 0  # this epoch's correct training predictions on this rank
        self._train_seen = 0
        self.val_acc, self.test_acc = (MulticlassAccuracy(num_classes, average="micro") for _ in range(2))
        self._augment_seed: Optional[int] = None  # the seed of this fit's crop/flip streams
        self._resumed_augment_seed: Optional[int] = None  # the seed of the checkpoint being resumed

    @staticmethod
    def _per_channel(name: str, value, channels: int) -> Tensor:
        t = torch.as_tensor(value, dtype=torch.float32).flatten()
        if t.numel() == 1:
            t = t.repeat(channels)
        if t.numel() != channels:
            raise ValueError(f"{name} needs 1 or in_chans={channels} values; got {t.numel()}")
        return t.view(1, channels, 1, 1)

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: Tensor) -> Tensor:
        """Logits for un-normalised images in [0, 1]."""
        return self.backbone(self.normalize(x))

    def _draw_augment_seed(self) -> int:
        seed = self.hparams.get("augment_seed")
        return int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)

    def on_train_start(self) -> None:
        """Fix this fit's augmentation seed: the resumed checkpoint's, else ``augment_seed``, else a draw."""
        seed, self._resumed_augment_seed = self._resumed_augment_seed, None
        if seed is None:
            seed = self._draw_augment_seed()
        self._augment_seed = Collective.of(self.trainer).broadcast(seed, 0)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._augment_seed is not None:
            checkpoint["augment_seed"] = self._augment_seed

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is None or self._trainer.state.fn != TrainerFn.FITTING:
            return  # loaded to evaluate, or to start a new fit from: no stream to continue
        seed = checkpoint.get("augment_seed")
        if seed is None and (self.hparams.crop_padding > 0 or self.hparams.flip):
            warnings.warn("the checkpoint holds no augmentation seed (written before it was saved): a resumed fit "
                          "augments with a new seed and is not the uninterrupted fit", UserWarning, stacklevel=2)
        elif seed is not None and self.hparams.get("augment_seed") not in (None, seed):
            warnings.warn(f"augment_seed={self.hparams.augment_seed} differs from the checkpoint's {seed}: a resumed "
                          f"fit keeps the checkpoint's", UserWarning, stacklevel=2)
        self._resumed_augment_seed = seed

    def augment(self, x: Tensor, batch_idx: int) -> Tensor:
        """Random crop and flip of a training batch, from the stream of ``(seed, epoch, batch_idx, rank)``."""
        hp = self.hparams
        if hp.crop_padding == 0 and not hp.flip:
            return x
        if self._augment_seed is None:  # training_step called outside a fit
            self._augment_seed = self._draw_augment_seed()
        generator = augmentation_generator(self._augment_seed, self.current_epoch, batch_idx, self.global_rank, x.device)
        return random_crop_flip(x, hp.crop_padding, hp.flip, generator=generator)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y, _ = unpack_batch(batch)
        x = self.augment(x, batch_idx)
        try:
            logits = self(x)
        except ValueError as err:  # BatchNorm in training refuses a single value per channel
            if len(x) == 1 and "more than 1 value per channel" in str(err):
                raise ValueError(
                    f"training batch {batch_idx} holds one image, and {type(self.backbone).__name__}'s BatchNorm needs "
                    "more than one value per channel in training: the training set leaves one image over its last "
                    "full batch. Set drop_last=True on the training DataLoader, or choose a batch size that does not "
                    "leave one image over (the certification loop lets such an image join the batch before it)"
                ) from err
            raise
        loss = self.criterion(logits, y)
        self._count_correct(logits, y)
        if self._loss_is_read(batch_idx):
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def _loss_is_read(self, batch_idx: int) -> bool:
        """Whether this step's loss is read: every step under a progress bar, else at the loggers' cadence.

        ``self.log`` costs about 0.8 ms a step on a CPU (BENCHMARKS.md, Lightning's overhead), as much as a
        twentieth of a small model's step. Loggers write step values every ``log_every_n_steps`` steps only;
        callbacks also see the value of each epoch's last batch.
        """
        trainer = self._trainer
        if trainer is None:
            return False  # called outside a fit: nothing to log to
        if trainer.progress_bar_callback is not None:
            return True
        last = trainer.num_training_batches
        return (self.global_step + 1) % trainer.log_every_n_steps == 0 or batch_idx + 1 == last

    def criterion(self, logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        """The training loss: cross-entropy (``reduction`` as for ``F.cross_entropy``)."""
        return F.cross_entropy(logits, y, reduction=reduction)

    def initialise_from_batch(self, x: Tensor) -> None:
        """Data-dependent initialisation from the first training batch (pixels, before augmentation): none here."""

    def eval_logits(self, logits_of, x: Tensor) -> Tensor:
        """The logits this model votes with in eval mode, given its plain forward ``logits_of``: those of ``x``."""
        return logits_of(x)

    @torch.no_grad()
    def _count_correct(self, logits: Tensor, y: Tensor) -> None:
        """Add a training batch's correct predictions to this epoch's count (logged in ``on_train_epoch_end``).

        Four tensor ops a step instead of a Metric update (about ten ops and its Python wrapper): about 0.3 ms a step
        less on a CPU (BENCHMARKS.md, Lightning's overhead).
        """
        self._train_correct = self._train_correct + (logits.argmax(1) == y).sum()
        self._train_seen += y.numel()

    def on_train_epoch_start(self) -> None:
        self._train_correct, self._train_seen = 0, 0

    def on_train_epoch_end(self) -> None:
        # Logged once an epoch: Lightning walks a logged Metric on each self.log call. Fed as this rank's accuracy
        # weighted by its samples, the MeanMetric syncs to the accuracy over every rank's samples.
        if self._train_seen:
            self.train_acc.update(self._train_correct / self._train_seen, weight=self._train_seen)
            self.log("train/acc", self.train_acc)

    def _evaluate(self, batch, stage: str, metric: MulticlassAccuracy) -> None:
        x, y, _ = unpack_batch(batch)
        logits = self(x)
        metric(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{stage}/acc", metric, prog_bar=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        x, _, _ = unpack_batch(batch)
        return self(x).argmax(dim=1)

    def recipe(self) -> dict:
        """The keyword arguments of :func:`~lightning_defense.core.recipe.sgd_with_steps` this model trains with."""
        hp = self.hparams
        return {"lr": hp.lr, "momentum": hp.momentum, "nesterov": hp.nesterov, "weight_decay": hp.weight_decay,
                "milestones": hp.milestones, "gamma": hp.gamma}

    def optimizer_and_schedule(self, max_epochs: int, total_steps: Optional[int] = None,
                               parameters: Optional[Mapping[str, Tensor]] = None,
                               modules: Optional[Mapping[str, nn.Module]] = None) -> tuple[Optimizer, LRScheduler, str]:
        """This recipe's optimizer and learning-rate schedule, and how often the schedule steps (``"epoch"``).

        Args:
            max_epochs: Epochs of the fit.
            total_steps: Optimizer steps of the fit (not used by this recipe).
            parameters: The tensors to train, by the names they have in ``modules``; None: this model's. The
                certification loop passes the stacked copies of a group's parameters.
            modules: The modules those names refer to; None: this model's.
        """
        params = parameters.values() if parameters is not None else self.parameters()
        optimizer, scheduler = sgd_with_steps(list(params), max_epochs, **self.recipe())
        return optimizer, scheduler, "epoch"

    def configure_optimizers(self):
        trainer = self._trainer
        max_epochs = trainer.max_epochs if trainer is not None and trainer.max_epochs and trainer.max_epochs > 0 else 80
        optimizer, scheduler, interval = self.optimizer_and_schedule(max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

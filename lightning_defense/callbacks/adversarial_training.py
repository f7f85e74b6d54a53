"""PGD adversarial training (Madry et al. 2018), a baseline defense against poisoning (Geiping et al.
2021a; Hong et al. Table 5; ECLIPSE Table 1)."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_defense.callbacks.modes import defense_pass
from lightning_defense.core import rng
from lightning_defense.core.batch import require_pixel_range
from lightning_defense.core.collective import Collective
from lightning_defense.core.pixels import Layout, Normalization, PixelSpace
from lightning_defense.core.seam import TrainingDataSeam

_RESUMED = 0x5E5  # purpose key of a stream that is new on resume (no saved state for this rank/device)


def pgd_attack(
    model, x: Tensor, y: Tensor, eps: float, steps: int, step_size: float, generator: Optional[torch.Generator] = None
) -> Tensor:
    """l_inf PGD with a random start: maximise the cross-entropy of ``model`` within ``eps`` of ``x``.

    ``model`` takes un-normalised images in [0, 1]; the result stays in [0, 1].
    """
    delta = (torch.rand(x.shape, device=x.device, generator=generator) * 2 - 1) * eps
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step_size * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1).detach()


class AdversarialTraining(L.Callback):
    """Replaces every training batch by its PGD adversarial examples before the training step.

    The attack runs in ``on_train_batch_start``, with the model in eval mode (so BatchNorm statistics are
    not updated by the attack's forward passes); afterwards every submodule gets its own mode back (a
    frozen :class:`LinearProbe` extractor stays in eval mode). The eps ball and the clamp act in [0, 1]
    pixel space, as in Madry et al.: the batch's images (in a ``(x, y)``, ``(x, y, index)`` or dict batch)
    are mapped to pixels through the training set's normalisation (a torchvision ``Normalize`` in its
    transform, a ``normalization`` attribute of the dataset or datamodule, or ``normalization=``), attacked
    through the model seen as a function of pixels, and written back in the user's space, so
    ``training_step`` stays as it is. Pixels outside [0, 1] are a clear error naming the fix, never a
    silent clamp. This package's own batches (pixels in [0, 1]) are attacked as they are; the model's own
    augmentation and normalisation follow in ``training_step``.

    The random starts come from one stream per seed and global rank, made in ``on_train_start``; every
    rank's stream state is saved in the checkpoint, so a resumed fit continues the stream of the
    uninterrupted one instead of replaying its first random starts.

    Args:
        eps: l_inf bound in [0, 1] pixel units (8/255 is the usual CIFAR-10 setting).
        steps: PGD steps.
        step_size: Step size; None uses 2.5 * eps / steps.
        seed: Seed of the random starts (one stream per seed and global rank).
        normalization: ``((mean, ...), (std, ...))`` the training images were normalised with, when no
            torchvision ``Normalize`` in the dataset's transform or ``normalization`` attribute says so.
        image_key, label_key: Dict batches: the keys of the images and the labels (found by name otherwise).

    Example::

        trainer = L.Trainer(callbacks=[AdversarialTraining(eps=8/255, steps=7)])
    """

    def __init__(self, eps: float = 8 / 255, steps: int = 7, step_size: Optional[float] = None, seed: int = 0,
                 normalization: Optional[Normalization] = None, image_key: Optional[str] = None,
                 label_key: Optional[str] = None) -> None:
        if not 0 < eps <= 1:
            raise ValueError(f"eps must be in (0, 1] (pixel units, e.g. 8/255); got {eps}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1; got {steps}")
        if step_size is not None and step_size <= 0:
            raise ValueError(f"step_size must be > 0; got {step_size}")
        self.eps = eps
        self.steps = steps
        self.step_size = step_size if step_size is not None else 2.5 * eps / steps
        self.seed = seed
        self.normalization = normalization
        self.image_key, self.label_key = image_key, label_key
        self._space = PixelSpace.of(normalization)  # until on_train_start reads the training set's
        self._generator: Optional[torch.Generator] = None
        self._trainer: Optional[L.Trainer] = None
        self._saved_generators: Optional[list] = None  # every rank's stream state, from a checkpoint

    @property
    def state_key(self) -> str:
        return self._generate_state_key(eps=self.eps, steps=self.steps, seed=self.seed)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            TrainingDataSeam.of(trainer)  # installed before the loaders exist: it records the user's training set

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = trainer
        self._space = self._pixel_space(trainer)
        rank, device = trainer.global_rank, pl_module.device
        self._generator = rng.generator(self.seed, rank, device=device)
        if self._saved_generators is None:
            return
        saved = self._saved_generators[rank] if rank < len(self._saved_generators) else None
        self._saved_generators = None
        if saved is not None and saved["device"] == device.type:
            self._generator.set_state(saved["state"])
            return
        warnings.warn(
            f"AdversarialTraining: the checkpoint holds no random-start stream state for rank {rank} on {device.type} "
            f"(more processes, or another device); starting a new stream keyed by the resumed step {trainer.global_step}"
        )
        self._generator = rng.generator(self.seed, rank, trainer.global_step, _RESUMED, device=device)

    def _pixel_space(self, trainer: L.Trainer) -> PixelSpace:
        try:
            view = TrainingDataSeam.of(trainer).training_view(self.normalization, self.image_key, self.label_key)
        except RuntimeError:  # no map-style training set to read: only what was given here
            return PixelSpace.of(self.normalization)
        return view.space

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        layout = Layout.detect(batch, self.image_key, self.label_key)
        x, y, _ = layout.split(batch)
        space = self._space
        pixels = space.to_pixels(x)
        if space.identity and layout.native:
            require_pixel_range(pixels, "AdversarialTraining")
        else:
            space.check(pixels, "AdversarialTraining")
        with defense_pass(trainer, pl_module), torch.enable_grad():
            adversarial = pgd_attack(space.model(pl_module), pixels, y, self.eps, self.steps, self.step_size,
                                     self._generator)
        x.copy_(space.from_pixels(adversarial))

    def state_dict(self) -> dict[str, Any]:
        """Every rank's random-start stream state (gathered on rank 0; Lightning builds a checkpoint on every rank)."""
        if self._generator is None:
            return {}
        mine = {"device": self._generator.device.type, "state": self._generator.get_state()}
        everyone = Collective.of(self._trainer).gather(mine)
        return {"generators": everyone if everyone is not None else [mine]}  # rank 0's copy is the one written

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved stream states; ``on_train_start`` continues this rank's."""
        self._saved_generators = list(state_dict.get("generators") or [])

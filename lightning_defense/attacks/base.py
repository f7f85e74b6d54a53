"""Shared pieces of the attacks: the interface, the attack goal, the eps-ball, budgets, surrogate training.

Every attack is a small class whose constructor takes the threat model (``eps``, ``norm``, ``budget``) and
its own hyper-parameters, and whose :meth:`Attack.craft` turns a clean training split into a
:class:`~lightning_defense.datamodules.PoisonSet`. Crafting is seeded: the same inputs and seed give the
same poisons.

Every stage that computes on a model (surrogate training, crafting, feature extractors) runs on the device
that :func:`~lightning_defense.core.device.resolve_device` gives for the attack's ``device`` setting, under
a stage name such as ``"witches_brew.surrogate"``. Random draws use CPU generators (then move), so a seed
names the same stream on every device, and the returned :class:`PoisonSet` holds CPU tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from lightning_defense.core.device import DeviceLike, autocast, check_device, check_precision, resolve_device
from lightning_defense.core.recipe import sgd_with_steps
from lightning_defense.datamodules.poison import NORMS, PoisonSet
from lightning_defense.models.augment import random_crop_flip
from lightning_defense.models.classifier import ImageClassifier


@dataclass
class AttackGoal:
    """What an attack aims at in one trial.

    Targeted attacks use ``target_image`` (C, H, W), its true ``target_label`` and the
    ``adversarial_label`` it should get. Backdoor attacks use ``source_class`` (the class whose triggered
    inputs should flip) and ``target_class`` (where they should go). Indiscriminate attacks need no goal.
    """

    target_image: Optional[Tensor] = None
    target_label: Optional[int] = None
    adversarial_label: Optional[int] = None
    target_index: Optional[int] = None
    source_class: Optional[int] = None
    target_class: Optional[int] = None


class Attack:
    """Base of every attack: the threat model and the ``craft`` interface.

    Args:
        eps: Perturbation bound in [0, 1] pixel units (e.g. ``16 / 255`` for l_inf).
        norm: ``"linf"`` or ``"l2"``.
        budget: Fraction of the training split the attacker may perturb, in (0, 1].
        progress: Show a tqdm progress bar while crafting.
        device: Where the attack computes: ``"auto"`` (the GPU of :attr:`collective`'s rank, else the current
            GPU, else the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:<i>"`` or ``"mps"``; see
            :func:`~lightning_defense.core.device.resolve_device`.
        precision: ``"32"``, or ``"bf16"``: bfloat16 autocast of the forward passes of surrogate training
            on a CUDA GPU (crafting itself stays in float32).

    Attributes:
        collective: The ``Trainer``/``Fabric``/:class:`~lightning_defense.core.Collective` whose rank's GPU
            ``device="auto"`` follows (None: the current GPU); :func:`~lightning_defense.evaluate.evaluate`
            sets it.

    Raises:
        ValueError: On an eps, norm, budget, device or precision outside the accepted range.
    """

    kind: str = "indiscriminate"
    name: str = "attack"

    def __init__(self, eps: float, norm: str = "linf", budget: float = 1.0, progress: bool = True,
                 device: str = "auto", precision: str = "32") -> None:
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a number > 0 in [0, 1] pixel units (e.g. 16/255); got {eps!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")
        if not (isinstance(budget, (int, float)) and 0 < budget <= 1):
            raise ValueError(f"budget must be a fraction of the training set in (0, 1]; got {budget!r}")
        self.eps = float(eps)
        self.norm = norm
        self.budget = float(budget)
        self.progress = progress
        self.device = device
        self.precision = check_precision(precision)
        self.collective: Any = None

    @property
    def device(self) -> DeviceLike:
        """The device setting (checked when set; resolved per stage by :meth:`stage_device`)."""
        return self._device

    @device.setter
    def device(self, value: DeviceLike) -> None:
        self._device = check_device(value, f"{type(self).__name__} device")

    def stage_device(self, stage: str) -> torch.device:
        """The device of ``stage`` of this attack (recorded as ``"<name>.<stage>"``)."""
        return resolve_device(self.device, self.collective, stage=f"{self.name}.{stage}",
                              what=f"{type(self).__name__} device")

    # -- the interface -------------------------------------------------------------------------------
    def craft(self, images: Tensor, labels: Tensor, *, goal: Optional[AttackGoal] = None, seed: int = 0) -> PoisonSet:
        """Craft poisons for the clean training split ``(images, labels)``.

        Args:
            images: ``(N, C, H, W)`` clean training images in [0, 1].
            labels: ``(N,)`` int64 labels.
            goal: The trial's target (targeted) or source/target classes (backdoor); unused otherwise.
            seed: Seeds every random choice of the attack.

        Returns:
            A :class:`PoisonSet` within ``eps`` that perturbs at most ``budget * N`` samples.
        """
        raise NotImplementedError

    def sample_goal(self, test_images: Tensor, test_labels: Tensor, num_classes: int, seed: int) -> Optional[AttackGoal]:
        """Pick the trial's goal at random (the papers' protocol): None for indiscriminate attacks."""
        generator = torch.Generator().manual_seed(int(seed))
        if self.kind == "targeted":
            index = int(torch.randint(len(test_images), (1,), generator=generator))
            true = int(test_labels[index])
            adversarial = _other_class(true, num_classes, generator)
            return AttackGoal(test_images[index], true, adversarial, target_index=index)
        if self.kind == "backdoor":
            source = int(torch.randint(num_classes, (1,), generator=generator))
            return AttackGoal(source_class=source, target_class=_other_class(source, num_classes, generator))
        return None

    # -- helpers for subclasses ------------------------------------------------------------------------
    def _bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=f"{self.name}: {desc}", disable=not self.progress, leave=False)

    def _metadata(self, seed: int, **extra) -> dict[str, str]:
        return {"attack": self.name, "seed": str(seed), **{k: str(v) for k, v in extra.items()}}


def _other_class(label: int, num_classes: int, generator: torch.Generator) -> int:
    offset = int(torch.randint(1, num_classes, (1,), generator=generator))
    return (label + offset) % num_classes


def check_split(images: Tensor, labels: Tensor) -> None:
    """Raise a clear error unless ``images`` (N, C, H, W) in [0, 1] and ``labels`` (N,) match."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor; got {getattr(images, 'shape', type(images))}")
    if not isinstance(labels, Tensor) or labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"labels must be a (N,) tensor matching images; got {getattr(labels, 'shape', type(labels))}")
    if len(images) and (images.min() < 0 or images.max() > 1):
        raise ValueError("images must be un-normalised pixels in [0, 1]")


def require_goal(attack: Attack, goal: Optional[AttackGoal], *fields: str) -> AttackGoal:
    """The goal, checked to carry ``fields``."""
    missing = [f for f in fields if goal is None or getattr(goal, f) is None]
    if missing:
        raise ValueError(f"{attack.name} needs goal with {', '.join(missing)}; pass goal=AttackGoal(...) "
                         f"or use attack.sample_goal(test_images, test_labels, num_classes, seed)")
    return goal


def project(delta: Tensor, clean: Tensor, eps: float, norm: str) -> Tensor:
    """Project ``delta`` onto the ``eps``-ball of ``norm`` and keep ``clean + delta`` in [0, 1].

    For l2 the ball projection comes first and the box clamp second; the clamp only shrinks each
    coordinate, so the result stays inside both sets.
    """
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * (eps / norms).clamp(max=1.0).view(-1, *([1] * (delta.ndim - 1)))
    return (clean + delta).clamp(0, 1) - clean


def budget_indices(candidates: Tensor, count: int, generator: torch.Generator, what: str) -> Tensor:
    """Draw ``count`` distinct indices from ``candidates`` (sorted), or fail naming the shortfall."""
    if count > len(candidates):
        raise ValueError(f"budget asks for {count} poisons but only {len(candidates)} {what} exist; lower budget")
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
    return chosen.sort().values


def adversarial_class_poisons(attack: Attack, labels: Tensor, goal: AttackGoal, generator: torch.Generator) -> Tensor:
    """A targeted attack's poison indices: ``attack.budget * N`` training images of ``goal``'s adversarial class,
    drawn from ``generator`` (so an attack and its noise control, seeded alike, pick the same images)."""
    candidates = (labels == goal.adversarial_label).nonzero().flatten()
    return budget_indices(candidates, budget_count(attack.budget, len(labels)), generator,
                          f"training images of the adversarial class {goal.adversarial_label}")


def target_fields(goal: AttackGoal, target_image: Tensor) -> dict:
    """The :class:`PoisonSet` fields that score a targeted attack: its target and the label it should get."""
    return {"target_images": target_image[None].float(),
            "target_labels": torch.tensor([int(goal.target_label if goal.target_label is not None else -1)]),
            "adversarial_labels": torch.tensor([goal.adversarial_label])}


def budget_count(budget: float, n: int) -> int:
    """Number of samples a fractional budget allows, at least one."""
    return max(1, int(round(budget * n)))


def poison_set(indices: Tensor, images: Tensor, labels: Tensor, attack: Attack, **fields) -> PoisonSet:
    """A PoisonSet of ``images[indices] + delta`` already computed; a thin constructor with the attack's bound.

    Tensors computed on an accelerator come back to the CPU.
    """
    fields = {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in fields.items()}
    return PoisonSet(indices.long().cpu(), images.detach().float().cpu().contiguous(), labels.long().cpu(), attack.norm,
                     attack.eps, kind=attack.kind, **fields)


def train_surrogate(
    images: Tensor,
    labels: Tensor,
    *,
    backbone: str = "small_cnn",
    backbone_kwargs: Optional[dict] = None,
    epochs: int = 10,
    lr: float = 0.05,
    batch_size: int = 64,
    crop_padding: int = 2,
    flip: bool = False,
    seed: int = 0,
    progress: bool = False,
    desc: str = "surrogate",
    device: DeviceLike = "auto",
    precision: str = "32",
    stage: str = "surrogate",
    collective: Any = None,
) -> ImageClassifier:
    """Train an :class:`ImageClassifier` on clean data with a plain loop (the attacker's model).

    SGD with Nesterov momentum and the papers' x0.1 steps at 3/8, 5/8 and 7/8 of training. Returns the
    model in eval mode (its parameters' ``requires_grad`` left on), on the device that ``device`` resolves
    to (recorded as ``stage``; ``"auto"`` follows ``collective``'s rank; see
    :func:`~lightning_defense.core.device.resolve_device`). The weights are
    initialised and the batches and augmentation drawn on the CPU, so the seed means the same on every
    device. ``precision="bf16"`` runs the forward passes under bfloat16 autocast on a CUDA GPU.
    """
    target = resolve_device(device, collective, stage=stage)
    precision = check_precision(precision)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    num_classes = int(labels.max()) + 1
    model = ImageClassifier(backbone, num_classes=max(num_classes, 2), in_chans=images.shape[1],
                            backbone_kwargs=backbone_kwargs).to(target)
    images, labels = images.to(target), labels.to(target)
    optimizer, scheduler = sgd_with_steps(model.parameters(), epochs * math.ceil(len(images) / batch_size), lr=lr)
    model.train()
    with tqdm(total=epochs, desc=desc, disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=generator)
            for start in range(0, len(images), batch_size):
                batch = order[start:start + batch_size]
                x = random_crop_flip(images[batch], crop_padding, flip, generator=generator)
                with autocast(target, precision):
                    loss = F.cross_entropy(model(x), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
            bar.update()
    return model.eval()


class IndiscriminateAttack(Attack):
    """Base of the indiscriminate attacks: perturb ``budget`` of the training set (all of it by default).

    Subclasses implement :meth:`perturbation`; this class picks the poisoned samples (seeded), projects
    onto the eps-ball and the [0, 1] box, and builds the :class:`PoisonSet`.
    """

    kind = "indiscriminate"

    def craft(self, images: Tensor, labels: Tensor, *, goal: Optional[AttackGoal] = None, seed: int = 0) -> PoisonSet:
        check_split(images, labels)
        device = self.stage_device("craft")
        generator = torch.Generator().manual_seed(int(seed))
        n = len(images)
        indices = torch.arange(n) if self.budget >= 1 else budget_indices(
            torch.arange(n), budget_count(self.budget, n), generator, "training samples")
        clean = images[indices].float().to(device)
        delta = self.perturbation(clean, labels[indices].to(device), generator).to(device)
        poisoned = clean + project(delta, clean, self.eps, self.norm)
        return poison_set(indices, poisoned, labels[indices], self, metadata=self._metadata(seed))

    def perturbation(self, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
        """The raw perturbation of each image (projected afterwards).

        ``images`` and ``labels`` are on the attack's device; ``generator`` is a CPU generator (draw on the
        CPU, then move to ``images.device``).
        """
        raise NotImplementedError


def scale_to_ball(delta: Tensor, eps: float, norm: str) -> Tensor:
    """Rescale each sample's ``delta`` so its ``norm`` equals ``eps`` (the attacks' full-budget patterns)."""
    flat = delta.flatten(1)
    size = flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)
    return delta * (eps / size.clamp_min(1e-12)).view(-1, *([1] * (delta.ndim - 1)))


def random_delta(shape: tuple, eps: float, norm: str, generator: torch.Generator) -> Tensor:
    """The noise controls' draw: uniform in [-eps, eps] per pixel (``linf``) or Gaussian scaled to l2 norm ``eps``.

    Drawn on the CPU from ``generator`` (the keyed stream), so the same seed gives the same noise on every device.
    """
    if norm == "linf":
        return (torch.rand(shape, generator=generator) * 2 - 1) * eps
    return scale_to_ball(torch.randn(shape, generator=generator), eps, "l2")


def apply_trigger(images: Tensor, trigger: Tensor, xy: Optional[str] = None) -> Tensor:
    """Paste the backdoor patch ``trigger`` (C, h, w) onto ``images``; ``xy`` is ``"x,y"`` (column, row) or None.

    Without a position the patch goes to the bottom-right corner (Sleeper Agent's default placement).
    """
    h, w = trigger.shape[-2:]
    height, width = images.shape[-2:]
    if xy:
        x, y = (int(v) for v in str(xy).split(","))
    else:
        x, y = width - w, height - h
    if not (0 <= x <= width - w and 0 <= y <= height - h):
        raise ValueError(f"trigger of size {h}x{w} at x,y={x},{y} does not fit {height}x{width} images")
    out = images.clone()
    out[..., y:y + h, x:x + w] = trigger.to(images.dtype)
    return out

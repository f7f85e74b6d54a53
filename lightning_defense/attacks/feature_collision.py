"""Feature-collision attacks on transfer learning: Poison Frogs and Bullseye Polytope.

The victim fine-tunes only a linear head on top of a FIXED, publicly known feature extractor
``f(x) = model.backbone.forward_features(model.normalize(x))``. The attacker perturbs ``budget * N``
training images of the adversarial class (their labels stay, so the poisons are clean-label) so that
their features land on the target's feature; a head trained on them then puts the target in the
adversarial class.

* **Poison Frogs** (Shafahi et al., NeurIPS 2018): each poison ``x_p`` collides with the target on its own,

      minimise  ||f(x_p) - f(x_t)||^2 + beta ||x_p - x_b||^2,

  by forward-backward splitting: a gradient (forward) step on the feature term, then the proximal
  (backward) step of the ``beta`` term, which pulls the poison towards its base ``x_b``.
* **Bullseye Polytope** (Aghakhani et al., EuroS&P 2021): the poisons' *mean* feature is pushed onto
  the target, which puts the target near the centre of the poisons' polytope in feature space,

      minimise  ||mean_j f(x_pj) - f(x_t)||^2 / ||f(x_t)||^2.

  A linear head's class regions are convex, so once every poison is classified as the adversarial class
  their mean -- the target -- is too.

Both are projected onto the ``eps`` ball (l_inf or l2) around their bases and onto the [0, 1] box after
every step, so the result is a valid :class:`PoisonSet`. The feature term is divided by ``||f(x_t)||^2``
in both (Poison Frogs states it unnormalised; the division only rescales its step size) and the
forward step uses Adam, as Bullseye Polytope's code does, so one ``lr`` (a fraction of ``eps``) suits
any extractor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lightning_defense.attacks.base import (
    Attack,
    AttackGoal,
    adversarial_class_poisons,
    check_split,
    poison_set,
    project,
    random_delta,
    require_goal,
    target_fields,
    train_surrogate,
)
from lightning_defense.datamodules.poison import PoisonSet
from lightning_defense.core.device import DeviceLike, resolve_device
from lightning_defense.core.store import atomic_write
from lightning_defense.models.backbones import load_backbone
from lightning_defense.models.classifier import ImageClassifier


def extract_features(model: ImageClassifier, images: Tensor) -> Tensor:
    """The fixed feature extractor of a transfer victim: ``backbone.forward_features(normalize(x))``, flattened."""
    return model.backbone.forward_features(model.normalize(images)).flatten(1)


def fit_linear_head(features: Tensor, labels: Tensor, num_classes: int, *, steps: int = 300, lr: float = 0.5,
                    weight_decay: float = 1e-3) -> nn.Linear:
    """The transfer victim's head: multinomial logistic regression on fixed features, full-batch gradient descent.

    Features are standardised (per dimension, over ``features``) for the descent and the scaling is folded
    back into the returned layer, so ``head(features)`` gives the logits. Deterministic: zero start,
    full batch, heavy-ball momentum 0.9. Runs on ``features``' device, where the head is returned.

    Args:
        features: ``(N, D)`` features of the (poisoned) training set.
        labels: ``(N,)`` labels.
        num_classes: Classes of the head.
        steps: Gradient steps.
        lr: Step size.
        weight_decay: L2 penalty on the weights of the standardised features.

    Raises:
        ValueError: On mismatched features/labels or a bad ``steps``.
    """
    if features.ndim != 2 or labels.shape != (len(features),):
        raise ValueError(f"features must be (N, D) and labels (N,); got {tuple(features.shape)} and {tuple(labels.shape)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r}")
    features = features.detach().float()
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    z = (features - mean) / std
    labels = labels.to(features.device)
    weight = torch.zeros(features.shape[1], num_classes, device=features.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=features.device, requires_grad=True)
    optimizer = torch.optim.SGD([weight, bias], lr=lr, momentum=0.9)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(z @ weight + bias, labels) + weight_decay * weight.pow(2).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    head = nn.Linear(features.shape[1], num_classes).to(features.device)
    with torch.no_grad():
        scaled = weight / std[:, None]
        head.weight.copy_(scaled.T)
        head.bias.copy_(bias - mean @ scaled)
    return head


def load_extractor(path: Union[str, Path], backbone: str = "small_cnn", backbone_kwargs: Optional[dict] = None, *,
                   num_classes: int, in_chans: int, device: DeviceLike = "auto", stage: str = "extractor",
                   collective=None) -> ImageClassifier:
    """An :class:`ImageClassifier` whose backbone is read from a ``.safetensors`` state dict (never unpickled),
    on the device ``device`` resolves to (recorded as ``stage``; see
    :func:`~lightning_defense.core.device.resolve_device`)."""
    from safetensors.torch import load_file

    target = resolve_device(device, collective, stage=stage)
    model = ImageClassifier(backbone, num_classes=num_classes, in_chans=in_chans, backbone_kwargs=backbone_kwargs)
    load_backbone(model.backbone, load_file(str(path)), reset_head=False, source=f"extractor_path {str(path)!r}")
    return model.to(target).eval()


class FeatureCollisionAttack(Attack):
    """Shared machinery of Poison Frogs and Bullseye Polytope: the extractor, the budget, the optimisation.

    Args:
        eps: Bound in [0, 1] pixel units (the papers: 8-16/255 l_inf on CIFAR-10).
        norm: ``"linf"`` or ``"l2"``.
        budget: Fraction of the training set poisoned, all from the adversarial class
            (the papers: 1-25 poisons, a few hundredths of a percent of CIFAR-10).
        steps: Optimisation steps.
        lr: Adam step size as a fraction of ``eps``.
        beta: Poison Frogs' pull towards the base, per unit of the normalised feature term (0 for Bullseye).
        extractor: The fixed, pretrained :class:`ImageClassifier` whose features are attacked. None trains
            one on the clean training split of the first :meth:`craft` call and keeps it for later calls
            (seeded by ``extractor_seed``, not by the crafting seed: the pretrained network of transfer
            learning is one public model, the same in every trial).
        backbone: Architecture of that trained extractor.
        backbone_kwargs: Its extra arguments, e.g. ``{"width": 16}``.
        extractor_epochs: Its epochs of clean training.
        extractor_lr: Its SGD learning rate.
        extractor_seed: Its seed.
        extractor_path: A ``.safetensors`` file with the extractor's backbone ``state_dict`` (as
            :meth:`save_extractor` writes it), loaded into ``backbone``/``backbone_kwargs`` instead of training
            one; the transfer victim of :func:`~lightning_defense.attacks.evaluate` starts from the same file.
        progress: Show a progress bar.
        device: Where the extractor is trained or loaded and the poisons crafted (``"auto"``, ``"cpu"``,
            ``"cuda[:i]"``, ``"mps"``); see :func:`~lightning_defense.core.device.resolve_device`. A given
            ``extractor`` is moved there.
        precision: ``"32"``, or ``"bf16"``: bfloat16 autocast of the extractor's training on a CUDA GPU
            (the collision itself stays in float32).

    Raises:
        ValueError: On a bad argument, naming it.
    """

    kind = "targeted"
    mean_collision = False

    def __init__(self, eps: float = 16 / 255, norm: str = "linf", budget: float = 0.01, steps: int = 200,
                 lr: float = 0.1, beta: float = 0.0, extractor: Optional[ImageClassifier] = None,
                 backbone: str = "small_cnn", backbone_kwargs: Optional[dict] = None, extractor_epochs: int = 10,
                 extractor_lr: float = 0.05, extractor_seed: int = 0, extractor_path: Optional[str] = None,
                 progress: bool = True, device: str = "auto", precision: str = "32") -> None:
        super().__init__(eps, norm, budget, progress, device, precision)
        for name, value in (("steps", steps), ("extractor_epochs", extractor_epochs)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr (a fraction of eps) must be > 0; got {lr!r}")
        if not (isinstance(beta, (int, float)) and beta >= 0):
            raise ValueError(f"beta must be >= 0; got {beta!r}")
        if extractor is not None and not (isinstance(extractor, ImageClassifier)
                                          and hasattr(extractor.backbone, "forward_features")):
            raise ValueError(f"extractor must be an ImageClassifier whose backbone has forward_features; got "
                             f"{type(extractor).__name__}")
        if extractor is not None and extractor_path is not None:
            raise ValueError("give extractor= (a model) or extractor_path= (a .safetensors file), not both")
        if extractor_path is not None and (Path(extractor_path).suffix != ".safetensors"
                                           or not Path(extractor_path).is_file()):
            raise ValueError(f"extractor_path must be an existing .safetensors file; got {extractor_path!r}")
        self.extractor_path = None if extractor_path is None else str(extractor_path)
        self.steps, self.lr, self.beta = steps, float(lr), float(beta)
        self.extractor = extractor
        self.backbone, self.backbone_kwargs = backbone, backbone_kwargs
        self.extractor_epochs, self.extractor_lr, self.extractor_seed = extractor_epochs, extractor_lr, extractor_seed

    def feature_extractor(self, images: Tensor, labels: Tensor) -> ImageClassifier:
        """The fixed extractor: the given one, the ``extractor_path`` file, or one trained on the clean split.

        It is on the attack's device (stage ``<name>.extractor``); a given extractor is moved there.
        """
        stage = f"{self.name}.extractor"
        if self.extractor is None and self.extractor_path is not None:
            self.extractor = load_extractor(self.extractor_path, self.backbone, self.backbone_kwargs,
                                            num_classes=max(int(labels.max()) + 1, 2), in_chans=images.shape[1],
                                            device=self.device, stage=stage, collective=self.collective)
        elif self.extractor is None:
            self.extractor = train_surrogate(
                images, labels, backbone=self.backbone, backbone_kwargs=self.backbone_kwargs,
                epochs=self.extractor_epochs, lr=self.extractor_lr, seed=self.extractor_seed,
                progress=self.progress, desc=f"{self.name}: feature extractor", device=self.device,
                precision=self.precision, stage=stage, collective=self.collective)
        else:
            self.extractor.to(self.stage_device("extractor"))
        return self.extractor.eval()

    def save_extractor(self, path: Union[str, Path], images: Tensor, labels: Tensor,
                       metadata: Optional[dict[str, str]] = None) -> Path:
        """Write :meth:`feature_extractor`'s backbone ``state_dict`` to ``path`` (``.safetensors``, atomically).

        :class:`~lightning_defense.callbacks.LinearProbe` (``checkpoint_path=path``) and ``extractor_path=path``
        load it back.
        """
        from safetensors.torch import save

        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"save_extractor: path must end in .safetensors; got {str(path)!r}")
        model = self.feature_extractor(images, labels)
        state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
        return atomic_write(path, save(state, metadata={k: str(v) for k, v in (metadata or {}).items()}))

    def collision_loss(self, features: Tensor, target_feature: Tensor) -> Tensor:
        """The feature term, divided by ``||f(x_t)||^2``: per poison (Poison Frogs) or of the mean (Bullseye)."""
        scale = target_feature.pow(2).sum().clamp_min(1e-12)
        if self.mean_collision:
            return (features.mean(0) - target_feature).pow(2).sum() / scale
        return (features - target_feature).pow(2).sum(1).sum() / scale

    def collide(self, model: ImageClassifier, clean: Tensor, target: Tensor,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, float]:
        """Optimise the perturbations of ``clean`` so their features collide with ``target``'s; returns (delta, loss).

        The optimisation starts from zero and draws nothing; ``generator`` (the crafting stream) is for
        :class:`FeatureCollisionNoiseControl`.
        """
        with torch.no_grad():
            target_feature = extract_features(model, target[None])[0]
        delta = torch.zeros_like(clean, requires_grad=True)
        step = self.lr * self.eps
        optimizer = torch.optim.Adam([delta], lr=step)
        with self._bar(self.steps, "feature collision") as bar:
            for _ in range(self.steps):
                loss = self.collision_loss(extract_features(model, clean + delta), target_feature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()  # forward step on the feature term
                with torch.no_grad():
                    if self.beta > 0:  # backward step: prox of beta ||delta||^2 with step size `step`
                        delta.div_(1 + 2 * step * self.beta)
                    delta.copy_(project(delta, clean, self.eps, self.norm))
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}")
        with torch.no_grad():
            final = self.collision_loss(extract_features(model, clean + delta), target_feature).item()
        return delta.detach(), final

    def craft(self, images: Tensor, labels: Tensor, *, goal: Optional[AttackGoal] = None, seed: int = 0) -> PoisonSet:
        check_split(images, labels)
        goal = require_goal(self, goal, "target_image", "adversarial_label")
        generator = torch.Generator().manual_seed(int(seed))
        indices = adversarial_class_poisons(self, labels, goal, generator)
        device = self.stage_device("craft")
        model = self.feature_extractor(images, labels).to(device)
        requires_grad = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():  # the extractor is fixed: gradients flow to the poisons only
            p.requires_grad_(False)
        try:
            clean = images[indices].float().to(device)
            target = goal.target_image.float().to(device)
            delta, loss = self.collide(model, clean, target, generator)
        finally:
            for p, flag in zip(model.parameters(), requires_grad):
                p.requires_grad_(flag)
        return poison_set(
            indices, clean + delta, labels[indices], self, **target_fields(goal, target),
            metadata=self._metadata(seed, collision_loss=f"{loss:.5f}", target_index=goal.target_index,
                                    extractor_seed=self.extractor_seed),
        )


class PoisonFrogs(FeatureCollisionAttack):
    """Poison Frogs (Shafahi et al. 2018): each poison's feature collides with the target's.

    See :class:`FeatureCollisionAttack` for the arguments; ``beta`` (default 0.1) weighs the pull to the base.

    Example::

        attack = PoisonFrogs(eps=16 / 255, budget=0.01, extractor=pretrained)
        goal = attack.sample_goal(test_images, test_labels, num_classes=10, seed=0)
        poisons = attack.craft(train_images, train_labels, goal=goal, seed=0)
    """

    name = "poison_frogs"
    mean_collision = False

    def __init__(self, eps: float = 16 / 255, norm: str = "linf", budget: float = 0.01, steps: int = 200,
                 lr: float = 0.1, beta: float = 0.1, **kwargs) -> None:
        super().__init__(eps, norm, budget, steps, lr, beta, **kwargs)


class BullseyePolytope(FeatureCollisionAttack):
    """Bullseye Polytope (Aghakhani et al. 2021): the poisons' mean feature collides with the target's.

    See :class:`FeatureCollisionAttack` for the arguments (no ``beta``: the eps-ball alone keeps poisons close).

    Example::

        attack = BullseyePolytope(eps=16 / 255, budget=0.01, extractor=pretrained)
        goal = attack.sample_goal(test_images, test_labels, num_classes=10, seed=0)
        poisons = attack.craft(train_images, train_labels, goal=goal, seed=0)
    """

    name = "bullseye_polytope"
    mean_collision = True

    def __init__(self, eps: float = 16 / 255, norm: str = "linf", budget: float = 0.01, steps: int = 200,
                 lr: float = 0.1, **kwargs) -> None:
        super().__init__(eps, norm, budget, steps, lr, 0.0, **kwargs)


class FeatureCollisionNoiseControl(FeatureCollisionAttack):
    """The random-noise control of Poison Frogs and Bullseye Polytope: same poisons, random deltas.

    It picks the budget's training images of the adversarial class exactly as the attack does (same goal, same
    seed: the same images) and perturbs each by its own random draw in the same eps-ball
    (:func:`~lightning_defense.attacks.base.random_delta`), with no optimisation. With the attack's extractor
    settings (``backbone``, ``backbone_kwargs``, ``extractor_epochs``, ``extractor_lr``, ``extractor_seed``) its
    transfer victims use the same extractor, so a target flipped here is the victim's own error, the floor the
    attack's success counts against. The poison set records the collision loss the noise reaches.

    Args: see :class:`FeatureCollisionAttack` (``steps``, ``lr`` and ``beta`` are unused).

    Example::

        control = FeatureCollisionNoiseControl(eps=32 / 255, budget=0.01, extractor=pretrained)
        poisons = control.craft(train_images, train_labels, goal=goal, seed=0)  # the attack's goal and seed
    """

    name = "feature_collision_noise_control"

    def collide(self, model: ImageClassifier, clean: Tensor, target: Tensor,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, float]:
        if generator is None:
            raise ValueError("FeatureCollisionNoiseControl.collide needs the crafting generator (call craft)")
        delta = project(random_delta(clean.shape, self.eps, self.norm, generator).to(clean.device), clean,
                        self.eps, self.norm)
        with torch.no_grad():
            target_feature = extract_features(model, target[None])[0]
            loss = self.collision_loss(extract_features(model, clean + delta), target_feature).item()
        return delta, loss

"""``lightning-defense poison``: craft one attack's poison set against the data's training split and save it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentParser

from lightning_defense.attacks import Attack, AttackGoal
from lightning_defense.cli.overrides import apply_overrides, split_overrides
from lightning_defense.core.batch import dataset_tensors
from lightning_defense.core.config import instantiate
from lightning_defense.core.device import resolve_device

SECTIONS = {"data", "attack"}


def _poison_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lightning-defense poison", description="Craft a poison set and save it.")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--data", type=dict, required=True, help="class_path/init_args of the clean datamodule")
    parser.add_argument("--attack", type=dict, required=True, help="class_path/init_args of a lightning_defense attack")
    parser.add_argument("--seed", type=int, default=0, help="seeds the goal and the crafting")
    parser.add_argument("--device", type=Optional[str], default=None,
                        help="where the attack crafts unless attack.init_args names a device: auto (the current "
                             "GPU, else the CPU; the attacks' default), cpu, cuda, cuda:<i> or mps")
    parser.add_argument("--output", type=str, required=True, help="the .safetensors or .npz file to write")
    parser.add_argument("--target_index", type=Optional[int], default=None, help="targeted: test image to attack")
    parser.add_argument("--adversarial_label", type=Optional[int], default=None, help="targeted: the class it should get")
    parser.add_argument("--source_class", type=Optional[int], default=None, help="backdoor: class to flip")
    parser.add_argument("--target_class", type=Optional[int], default=None, help="backdoor: class to flip to")
    return parser


def run_poison(argv: list[str]) -> None:
    """Craft the configured attack's poisons against the data's training split and save them.

    ``--data.init_args.X=V`` and ``--attack.init_args.X=V`` override single entries of the config.
    ``--device`` (or ``--attack.init_args.device``) says where the attack computes.
    """
    try:
        argv, overrides = split_overrides(argv, SECTIONS)
    except ValueError as err:
        sys.exit(f"lightning-defense poison: {err}")
    args = _poison_parser().parse_args(argv)
    output = Path(args.output)
    if output.suffix not in (".safetensors", ".npz"):
        sys.exit(f"lightning-defense poison: --output must end in .safetensors or .npz; got {args.output!r}")
    sections = {"data": dict(args.data), "attack": dict(args.attack)}
    try:
        apply_overrides(sections, overrides)
        data = instantiate(sections["data"], L.LightningDataModule, "--data")
        attack = instantiate(sections["attack"], Attack, "--attack")
        if args.device is not None and "device" not in (sections["attack"].get("init_args") or {}):
            attack.device = args.device
        resolve_device(attack.device, what="the attack's device")  # a device this machine lacks fails here
    except ValueError as err:
        sys.exit(f"lightning-defense poison: {err}")
    data.prepare_data()
    data.setup("fit")
    images, labels = dataset_tensors(data.train_set)
    test_images, test_labels = dataset_tensors(data.test_set)
    goal = attack.sample_goal(test_images, test_labels, data.num_classes, args.seed)
    if attack.kind == "targeted" and args.target_index is not None:
        if not 0 <= args.target_index < len(test_images):
            sys.exit(f"lightning-defense poison: --target_index {args.target_index} is outside [0, {len(test_images)})")
        goal = AttackGoal(test_images[args.target_index], int(test_labels[args.target_index]), goal.adversarial_label,
                          target_index=args.target_index)
    if attack.kind == "targeted" and args.adversarial_label is not None:
        goal.adversarial_label = args.adversarial_label
    if attack.kind == "backdoor":
        goal.source_class = goal.source_class if args.source_class is None else args.source_class
        goal.target_class = goal.target_class if args.target_class is None else args.target_class
    poisons = attack.craft(images, labels, goal=goal, seed=args.seed)
    poisons.validate(images, labels)
    output.parent.mkdir(parents=True, exist_ok=True)
    poisons.save(output)
    linf, l2 = poisons.perturbation_norms(images)
    print(f"{attack.name}: {len(poisons)} poisons of {len(images)} training images ({poisons.kind}, {poisons.norm} "
          f"eps={poisons.eps:.4g}; max linf {float(linf.max()):.4g}, max l2 {float(l2.max()):.4g}) -> {output}")

"""``lightning-defense poison`` and ``lightning-defense evaluate``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from jsonargparse import ActionConfigFile, ArgumentParser



def _poison_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lightning-defense poison", description="Craft a poison set and save it.")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--data", type=dict, required=True, help="class_path/init_args of the clean datamodule")
    parser.add_argument("--attack", type=dict, required=True, help="class_path/init_args of a lightning_defense attack")
    parser.add_argument("--seed", type=int, default=0, help="seeds the goal and the crafting")
    parser.add_argument("--output", type=str, required=True, help="the .safetensors or .npz file to write")
    parser.add_argument("--target_index", type=Optional[int], default=None, help="targeted: test image to attack")
    parser.add_argument("--adversarial_label", type=Optional[int], default=None, help="targeted: the class it should get")
    parser.add_argument("--source_class", type=Optional[int], default=None, help="backdoor: class to flip")
    parser.add_argument("--target_class", type=Optional[int], default=None, help="backdoor: class to flip to")
    return parser


def run_poison(argv: list[str]) -> None:
    """Craft the configured attack's poisons against the data's training split and save them."""
    from lightning_defense.attacks._common import Attack, AttackGoal
    from lightning_defense.attacks.evaluation import _tensors, instantiate

    args = _poison_parser().parse_args(argv)
    output = Path(args.output)
    if output.suffix not in (".safetensors", ".npz"):
        sys.exit(f"lightning-defense poison: --output must end in .safetensors or .npz; got {args.output!r}")
    data = instantiate(args.data, "data")
    attack = instantiate(args.attack, "attack")
    if not isinstance(attack, Attack):
        sys.exit(f"lightning-defense poison: --attack {args.attack.get('class_path')} is not a lightning_defense Attack")
    data.prepare_data()
    data.setup("fit")
    images, labels = _tensors(data.train_set)
    test_images, test_labels = _tensors(data.test_set)
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


def _evaluate_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lightning-defense evaluate",
                            description="Run the papers' protocol: T trials of attack x defense, one table.")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--data", type=dict, required=True, help="class_path/init_args of the clean datamodule")
    parser.add_argument("--attacks", type=list, default=[],
                        help="list of {name, class_path, init_args, victim: {model, trainer, callbacks, transfer}}")
    parser.add_argument("--defenses", type=list, default=[], help="list of {name, callbacks: [...], wrapper: {...}}")
    parser.add_argument("--model", type=dict, default={}, help="ImageClassifier arguments of the victim")
    parser.add_argument("--trainer", type=dict, default={}, help="lightning.Trainer arguments of the victim")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", type=str, default="runs/evaluate")
    parser.add_argument("--poison", type=Optional[str], default=None,
                        help="evaluate this poison file instead of crafting (.safetensors/.npz/.npy/benchmark dir)")
    parser.add_argument("--poison_eps", type=Optional[float], default=None, help="bound of a .npy or benchmark poison")
    parser.add_argument("--poison_norm", type=str, default="linf")
    parser.add_argument("--trust_pickle", type=bool, default=False, help="allow a benchmark pickle directory")
    parser.add_argument("--progress", type=bool, default=True)
    return parser


def evaluation_config(argv: list[str]):
    """The :class:`EvaluationConfig` that ``lightning-defense evaluate argv...`` runs."""
    from lightning_defense.attacks.evaluation import EvaluationConfig

    args = _evaluate_parser().parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k != "config"}
    if fields["poison"] is not None and not Path(fields["poison"]).exists():
        sys.exit(f"lightning-defense evaluate: --poison {fields['poison']} does not exist")
    fields = {k: _plain(v) for k, v in fields.items()}
    for section in ("model", "trainer"):  # "--trainer.max_epochs 2" arrives as the string "2"
        fields[section] = {k: _scalar(v) for k, v in fields[section].items()}
    return EvaluationConfig(**fields)


def run_evaluate(argv: list[str]) -> None:
    """Run (or resume) the evaluation and print the "(accuracy) success" table."""
    from lightning_defense.attacks.evaluation import _distributed, _global_rank, evaluate

    import logging

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # one "GPU available" banner per victim is noise
    config = evaluation_config(argv)
    _, table = evaluate(config)
    if _global_rank() != 0:  # under DDP every rank runs the trials; rank 0 reports
        return
    print(table)
    if _distributed():
        import torch.distributed as dist

        print(f"\nvictims trained with DDP on {dist.get_world_size()} processes")
    print(f"\nwritten: {Path(config.output_dir) / 'table.md'} (.csv, .json); per-trial results under "
          f"{Path(config.output_dir) / 'trials'}")


def _plain(value):
    """jsonargparse Namespaces -> dicts (nested), so configs reach the harness as plain data."""
    from jsonargparse import Namespace

    if isinstance(value, Namespace):
        return {k: _plain(v) for k, v in vars(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _scalar(value):
    """A command-line override of a dict entry, read as YAML ("2" -> 2, "false" -> False)."""
    import yaml

    if isinstance(value, str):
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    return value

"""Certification throughput: models trained per hour, a group at once against one at a time.

Trains the same models (same draws, seeds and data: Gaussian-noised digits) one at a time and in groups
of ``--models_per_batch``, the group as one network with its layers stacked along the channels
(``models.grouped``) and, for comparison, with ``torch.func.vmap`` over stacked weights. The three ways
alternate ``--repeats`` times; it prints the median time of each, the median of the per-repeat ratios with
their range, and how often the groups' votes equal the one-at-a-time votes.

    python benchmarks/certify_throughput.py --num_models 16 --models_per_batch 16 --image_size 8 --width 8 --max_epochs 2
    python benchmarks/certify_throughput.py --backbone airbench ...   # airbench94's network, widths (w, 2w, 2w)
    python benchmarks/certify_throughput.py --recipe fast --backbone airbench ...   # and its recipe (FastImageClassifier)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_defense.certify import build_model, train_and_vote
from lightning_defense.core.host_memory import reuse_freed_memory
from lightning_defense.datamodules import DigitsDataModule, GaussianNoiseDataModule
from lightning_defense.models import FastImageClassifier, ImageClassifier

RECIPES = {"classifier": ImageClassifier, "fast": FastImageClassifier}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_models", type=int, default=16)
    parser.add_argument("--models_per_batch", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=8)
    parser.add_argument("--backbone", choices=("small_cnn", "airbench"), default="small_cnn")
    parser.add_argument("--width", type=int, default=8, help="SmallCNN width; airbench's widths are (w, 2w, 2w)")
    parser.add_argument("--recipe", choices=tuple(RECIPES), default="classifier",
                        help="ImageClassifier's recipe, or FastImageClassifier's (airbench94's: --backbone airbench)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (airbench's scaled head learns at about 2)")
    parser.add_argument("--max_epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.recipe == "fast" and args.backbone != "airbench":
        parser.error("--recipe fast trains airbench94's network: add --backbone airbench")
    reuse_freed_memory()  # as the command line does
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dm = DigitsDataModule(image_size=args.image_size, batch_size=args.batch_size)
    dm.setup("fit")
    test_images, labels = dm.test_set.tensors()
    widths = {"width": args.width} if args.backbone == "small_cnn" else {"widths": [args.width, 2 * args.width, 2 * args.width]}
    model_args = (RECIPES[args.recipe],
                  {"backbone": args.backbone, "backbone_kwargs": widths, "lr": args.lr, "crop_padding": 1, "flip": False})
    indices = list(range(args.num_models))
    data = {}
    for i in indices:  # smoothing is not timed: every way uses the same noised sets
        wrapper = GaussianNoiseDataModule(dm, sigma=0.25, seed=i)
        wrapper.setup("fit")
        data[i] = wrapper.train_set.tensors()
    common = dict(seed=0, max_epochs=args.max_epochs, batch_size=args.batch_size, limit_train_batches=None,
                  device=device)

    def one_at_a_time():
        return torch.cat([train_and_vote([build_model(model_args, 10, 1, 0, i)], [i], [data[i]], test_images,
                                         together=False, **common) for i in indices])

    def grouped(stacking):
        def run():
            out = []
            for start in range(0, len(indices), args.models_per_batch):
                group = indices[start : start + args.models_per_batch]
                out.append(train_and_vote([build_model(model_args, 10, 1, 0, i) for i in group], group,
                                          [data[i] for i in group], test_images, together=len(group) > 1,
                                          stacking=stacking, **common))
            return torch.cat(out)
        return run

    ways = {"one at a time": one_at_a_time, "stacked layers": grouped("layers"), "vmap": grouped("vmap")}
    seconds = {name: [] for name in ways}
    votes = {}
    for _ in range(args.repeats):
        for name, run in ways.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            votes[name] = run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start)
    per_hour = lambda s: 3600.0 * len(indices) / s  # noqa: E731
    print(f"device {device}, torch threads {torch.get_num_threads()}, {len(indices)} models in groups of "
          f"{args.models_per_batch}, {RECIPES[args.recipe].__name__} {args.backbone} {widths}, {args.image_size}x{args.image_size}, "
          f"{args.max_epochs} epoch(s) of {len(data[0][0])} images, batch {args.batch_size}, {args.repeats} repeats")
    single = seconds["one at a time"]
    for name, times in seconds.items():
        line = f"{name:15s} {statistics.median(times):7.2f} s  {per_hour(statistics.median(times)):9.0f} models/hour"
        if name != "one at a time":
            ratios = [a / b for a, b in zip(single, times)]
            agree = (votes[name] == votes["one at a time"]).float().mean().item()
            line += (f"  ratio {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f})"
                     f"  votes equal to one at a time: {agree:.4f}")
        print(line)
    accuracy = (votes["stacked layers"] == labels).float().mean().item()
    print(f"mean model test accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()

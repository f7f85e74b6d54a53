"""Certification throughput: models trained per hour, batched with ``torch.func.vmap`` against one at a time.

Trains the same models (same draws, seeds and data: Gaussian-noised digits) both ways in one run,
checks that both give the same votes, and prints models/hour for each and the ratio.

    python benchmarks/certify_throughput.py --num_models 8 --models_per_batch 8 --image_size 16 --max_epochs 1
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_defense.certify import build_model, train_and_vote
from lightning_defense.datamodules import DigitsDataModule, GaussianNoiseDataModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_models", type=int, default=8)
    parser.add_argument("--models_per_batch", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=16)
    parser.add_argument("--width", type=int, default=16, help="SmallCNN width")
    parser.add_argument("--max_epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    dm = DigitsDataModule(image_size=args.image_size, batch_size=args.batch_size)
    dm.setup("fit")
    test_images = dm.test_set.tensors()[0]
    model_args = {"backbone": "small_cnn", "backbone_kwargs": {"width": args.width}, "lr": 0.05,
                  "crop_padding": 1, "flip": False}
    indices = list(range(args.num_models))
    data = {}
    for i in indices:  # smoothing is not timed: both ways use the same noised sets
        wrapper = GaussianNoiseDataModule(dm, sigma=0.25, seed=i)
        wrapper.setup("fit")
        data[i] = wrapper.train_set.tensors()
    common = dict(seed=0, max_epochs=args.max_epochs, batch_size=args.batch_size, limit_train_batches=None,
                  device=device)

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    def one_at_a_time():
        return torch.cat([train_and_vote([build_model(model_args, 10, 1, 0, i)], [i], [data[i]], test_images,
                                         use_vmap=False, **common) for i in indices])

    def batched():
        out = []
        for start in range(0, len(indices), args.models_per_batch):
            group = indices[start : start + args.models_per_batch]
            out.append(train_and_vote([build_model(model_args, 10, 1, 0, i) for i in group], group,
                                      [data[i] for i in group], test_images, use_vmap=len(group) > 1, **common))
        return torch.cat(out)

    single_votes, single_s = timed(one_at_a_time)
    batched_votes, batched_s = timed(batched)
    labels = dm.test_set.tensors()[1]
    per_hour = lambda seconds: 3600.0 * len(indices) / seconds  # noqa: E731
    print(f"device {device}, torch threads {torch.get_num_threads()}, {len(indices)} models, SmallCNN width {args.width}, "
          f"{args.image_size}x{args.image_size}, {args.max_epochs} epoch(s) of {len(data[0][0])} images, batch {args.batch_size}")
    print(f"one at a time:           {single_s:8.1f} s  {per_hour(single_s):10.0f} models/hour")
    print(f"batched (vmap, {args.models_per_batch:3d}/batch): {batched_s:8.1f} s  {per_hour(batched_s):10.0f} models/hour")
    print(f"ratio batched / one at a time: {single_s / batched_s:.2f}x")
    print(f"same votes both ways: {torch.equal(single_votes, batched_votes)} "
          f"(agreement {(single_votes == batched_votes).float().mean().item():.4f}); "
          f"mean model test accuracy {(batched_votes == labels).float().mean().item():.3f}")


if __name__ == "__main__":
    main()

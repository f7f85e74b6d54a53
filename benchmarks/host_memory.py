"""CPU training with glibc's allocator as it comes / with freed tensors reused (``core.host_memory``), measured in one run.

Each measurement is a fresh process (the allocator is set once per process) that fits ``ImageClassifier`` on the
digits for a few epochs and reports the fit's wall-clock seconds and minor page faults. Default and tuned
processes alternate (ABBA); the median of the per-pair ratios is printed.

    python benchmarks/host_memory.py                                     # small CNN width 16, 16x16, batch 64
    python benchmarks/host_memory.py --backbone resnet18_cifar --image-size 32 --batch-size 128 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    """One fit in this process, with the allocator tuned or not; prints its seconds, page faults and steps."""
    import lightning as L
    import torch

    from lightning_defense.core.host_memory import reuse_freed_memory
    from lightning_defense.datamodules import DigitsDataModule
    from lightning_defense.models import ImageClassifier

    tuned = reuse_freed_memory() if args.worker == "tuned" else False
    if args.threads:
        torch.set_num_threads(args.threads)
    dm = DigitsDataModule(image_size=args.image_size, num_channels=args.channels, batch_size=args.batch_size, seed=0)
    torch.manual_seed(0)
    kwargs = {"width": args.width} if args.backbone == "small_cnn" else {}
    model = ImageClassifier(args.backbone, num_classes=10, in_chans=args.channels, lr=0.05, flip=False,
                            crop_padding=2, backbone_kwargs=kwargs, augment_seed=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, limit_train_batches=args.limit_batches or 1.0)
    faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    print(json.dumps({"tuned": tuned, "seconds": seconds, "faults": faults, "steps": trainer.global_step}))


def measure(args, mode: str) -> dict:
    argv = [f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items() if name not in ("repeats", "worker")]
    proc = subprocess.run([sys.executable, __file__, *argv, f"--worker={mode}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["tuned"] != (mode == "tuned"):
        sys.exit(f"the {mode} process did not run as asked: {result}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--limit-batches", type=int, default=0, help="training batches an epoch (0: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=("default", "tuned"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    runs = {"default": [], "tuned": []}
    for r in range(args.repeats):  # default first in even pairs, tuned first in odd ones
        for mode in ("tuned", "default") if r % 2 else ("default", "tuned"):
            runs[mode].append(measure(args, mode))
    steps = runs["tuned"][0]["steps"]
    for mode, results in runs.items():
        print(f"glibc {mode}: fit {statistics.median(r['seconds'] for r in results):.2f} s, "
              f"{statistics.median(r['faults'] for r in results) / steps:.0f} minor page faults a step ({steps} steps)")
    ratios = [d["seconds"] / t["seconds"] for d, t in zip(runs["default"], runs["tuned"])]
    print(f"fit time, glibc default / freed memory reused: {statistics.median(ratios):.3f}x (median of {args.repeats} "
          f"alternating pairs; range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()

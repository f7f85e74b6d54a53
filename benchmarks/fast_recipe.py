"""The fast recipe (``FastImageClassifier``, airbench94-style) measured in one run: time per model and accuracy.

1. Fashion-MNIST: ``Trainer.fit`` of the recipe of ``configs/fashion_mnist/fast_baseline.yaml`` (model, data,
   epochs), then its test accuracy on the 10,000 test images; the wall time per model covers building the
   model, the fit (whitening included) and nothing else (data loading is timed apart).
2. Models per hour against the ResNet-18 recipe at CIFAR size (32x32x3): the time of one training step of
   each recipe (forward, loss, backward, optimizer and scheduler step) on the same synthetic batch, times each
   recipe's steps per model: epochs x ceil(training images / batch size), from ``configs/cifar10/certify.yaml``
   (ResNet-18) and ``configs/cifar10/fast_recipe.yaml``. The ratio is from measured per-step times, not from
   whole fits (a ResNet-18 fit at CIFAR scale takes hours on a CPU).

    python benchmarks/fast_recipe.py                    # the whole Fashion-MNIST fit, steps at the configs' batch sizes
    python benchmarks/fast_recipe.py --small            # 2,000 training images, 1 epoch, steps at batch 16 (CI)
    python benchmarks/fast_recipe.py --skip-fit --device cuda --precision bf16   # models per GPU-hour (gpu.sh)
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import lightning as L
import torch
import yaml

from lightning_defense.core.host_memory import reuse_freed_memory
from lightning_defense.datamodules import FashionMNISTDataModule
from lightning_defense.models import FastImageClassifier, ImageClassifier

ROOT = Path(__file__).resolve().parents[1]
FASHION = ROOT / "configs" / "fashion_mnist" / "fast_baseline.yaml"
CIFAR_FAST = ROOT / "configs" / "cifar10" / "fast_recipe.yaml"
CIFAR_RESNET = ROOT / "configs" / "cifar10" / "certify.yaml"
CIFAR_TRAIN_IMAGES = 50_000


def model_args(section: dict) -> dict:
    """A config's model arguments (``init_args`` of a ``class_path`` section, or the section itself)."""
    return dict(section.get("init_args", section)) if "class_path" in section else dict(section)


def fashion_fit(args) -> tuple[float, float, float, int]:
    """``(data seconds, fit seconds, test accuracy, training images)`` of one model of the Fashion-MNIST config."""
    config = yaml.safe_load(FASHION.read_text())
    data_args = dict(config["data"]["init_args"])
    if args.data_dir:
        data_args["data_dir"] = args.data_dir
    start = time.perf_counter()
    dm = FashionMNISTDataModule(**data_args)
    dm.setup("fit")
    if args.small:  # a subset of the real files, so the whole path runs in seconds
        dm.train_set = torch.utils.data.Subset(dm.train_set, range(2000))
        dm.test_set = torch.utils.data.Subset(dm.test_set, range(1000))
    data_s = time.perf_counter() - start
    epochs = 1 if args.small else int(config["trainer"]["max_epochs"])
    L.seed_everything(config.get("seed_everything", 0), verbose=False)
    start = time.perf_counter()
    model = FastImageClassifier(**model_args(config["model"]), num_classes=10, in_chans=dm.num_channels)
    trainer = L.Trainer(accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1, max_epochs=epochs,
                        logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, deterministic=True,
                        precision="bf16-mixed" if args.precision == "bf16" else "32-true")
    trainer.fit(model, train_dataloaders=dm.train_dataloader())
    fit_s = time.perf_counter() - start
    result = trainer.test(model, dataloaders=dm.test_dataloader(), verbose=False)[0]
    return data_s, fit_s, float(result["test/acc"]), len(dm.train_set)


def step_seconds(model: L.LightningModule, batch_size: int, repeats: int, total_steps: int, device: torch.device,
                 precision: str = "32") -> float:
    """Median seconds of one training step of ``model`` (its own training_step and optimizers) at 32x32x3, on
    ``device``, in float32 or under bfloat16 autocast."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (batch_size,), generator=gen).to(device)
    model = model.to(device)
    # each recipe's own optimizer and schedule over total_steps (ImageClassifier's milestones counted in steps here)
    optimizer, scheduler, _ = model.optimizer_and_schedule(total_steps, total_steps)
    model.train()
    times = []
    for i in range(repeats + 1):  # the first step warms up (and whitens)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model.training_step((x, y), i)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def models_per_hour_ratio(args) -> None:
    fast_cfg, resnet_cfg = yaml.safe_load(CIFAR_FAST.read_text()), yaml.safe_load(CIFAR_RESNET.read_text())
    recipes = []
    for name, cfg, cls in (("ResNet-18 recipe", resnet_cfg, ImageClassifier), ("fast recipe", fast_cfg, FastImageClassifier)):
        batch = int(cfg["data"]["init_args"]["batch_size"])
        epochs = int(cfg["trainer"]["max_epochs"])
        train_images = round(CIFAR_TRAIN_IMAGES * (1 - cfg["data"]["init_args"].get("val_fraction", 0.1)))
        steps = epochs * math.ceil(train_images / batch)
        measure_batch = args.step_batch or batch
        kwargs = model_args(cfg["model"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = cls(**kwargs, num_classes=10, in_chans=3)
        per_step = step_seconds(model, measure_batch, args.repeats, steps, torch.device(args.device), args.precision)
        per_model = per_step * (batch / measure_batch) * steps  # per-example scaling when measured at another batch
        recipes.append((name, batch, epochs, steps, measure_batch, per_step, per_model))
        print(f"{name}: batch {batch}, {epochs} epochs, {steps} steps per model; one step at batch {measure_batch}: "
              f"{per_step:.3f} s (median of {args.repeats}); {per_model / 60:.1f} min per model, "
              f"{3600 / per_model:.2f} models per hour on {args.device} ({args.precision})")
    ratio = recipes[0][-1] / recipes[1][-1]
    print(f"models per hour, fast recipe / ResNet-18 recipe, at 32x32x3: {ratio:.1f}x "
          f"(from measured per-step times x steps per model, {args.device}, {args.precision}"
          f"{f', {torch.get_num_threads()} threads' if args.device == 'cpu' else ''})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="2,000 Fashion-MNIST images, 1 epoch, steps at batch 16")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST directory (default: the config's)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per recipe (default 3; 2 with --small)")
    parser.add_argument("--step-batch", type=int, default=None,
                        help="batch size of the timed steps (default: each config's; 16 with --small)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-fit", action="store_true", help="only the per-step ratio")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the fit and the timed steps run")
    parser.add_argument("--precision", choices=("32", "bf16"), default="32",
                        help="float32, or bfloat16 autocast (the fit: Lightning's bf16-mixed)")
    args = parser.parse_args()
    reuse_freed_memory()  # as the command line does
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is visible to torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (2 if args.small else 3)
    if args.small and args.step_batch is None:
        args.step_batch = 16
    if not args.skip_fit:
        data_s, fit_s, acc, n = fashion_fit(args)
        print(f"fast recipe on Fashion-MNIST ({FASHION.relative_to(ROOT)}{', --small' if args.small else ''}): "
              f"{n} training images, test accuracy {acc:.4f}, {fit_s:.1f} s per model "
              f"(data loading {data_s:.1f} s, once)")
    models_per_hour_ratio(args)


if __name__ == "__main__":
    main()

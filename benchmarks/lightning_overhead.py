"""Lightning's own overhead: ``Trainer.fit`` of ``ImageClassifier`` / a plain PyTorch loop, measured in one run.

Both train the same model (same initial weights), with the same optimiser and schedule
(``sgd_with_steps``), the same augmentation (``ImageClassifier.augment``: keyed crop/flip), on batches from
the same training loader, for the same epochs. The fit is configured as a library run is (no logger,
progress bar, checkpoint or validation); ``training_step`` logs the loss and updates the accuracy metric as
always. The plain loop is ``zero_grad / forward / cross-entropy / backward / step`` and a scheduler step per
epoch. Fits and loops alternate (ABBA), and the median of the per-pair ratios is reported, of wall-clock time and
of this process's CPU time (which other processes on a shared machine disturb less).

    python benchmarks/lightning_overhead.py                   # digits 16x16, small CNN width 16, batch 64, 8 epochs
    python benchmarks/lightning_overhead.py --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F

from lightning_defense.core.batch import unpack_batch
from lightning_defense.core.recipe import sgd_with_steps
from lightning_defense.datamodules import DigitsDataModule
from lightning_defense.models import ImageClassifier


def build(args):
    dm = DigitsDataModule(image_size=args.image_size, batch_size=args.batch_size, seed=0)
    dm.setup("fit")
    torch.manual_seed(0)
    model = ImageClassifier("small_cnn", num_classes=10, in_chans=1, lr=0.05, flip=False, crop_padding=2,
                            backbone_kwargs={"width": args.width}, augment_seed=0)
    return dm, model


def lightning_fit(args) -> float:
    dm, model = build(args)
    trainer = L.Trainer(accelerator=args.device, devices=1, max_epochs=args.epochs, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, datamodule=dm)
    return time.perf_counter() - start, time.process_time() - cpu


def plain_loop(args) -> float:
    dm, model = build(args)
    device = torch.device(args.device)
    model = model.to(device)
    start, cpu = time.perf_counter(), time.process_time()
    loader = dm.train_dataloader()
    optimizer, scheduler = sgd_with_steps(model.parameters(), args.epochs, **model.recipe())
    model._augment_seed = 0
    model.train()
    for epoch in range(args.epochs):
        loader.sampler.set_epoch(epoch)
        for batch_idx, batch in enumerate(loader):
            x, y, _ = unpack_batch(batch)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x = model.augment(x, batch_idx)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the Trainer's accelerator)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lightning_fit(args), plain_loop(args)  # warm-up: imports, allocator, dataset
    fits, loops = [], []
    for r in range(args.repeats):  # fit first in even pairs, loop first in odd ones: a drift favours neither
        if r % 2:
            loops.append(plain_loop(args))
            fits.append(lightning_fit(args))
        else:
            fits.append(lightning_fit(args))
            loops.append(plain_loop(args))
    steps = args.epochs * -(-1258 // args.batch_size)
    for k, clock in enumerate(("wall-clock", "CPU time")):
        fit, loop = [f[k] for f in fits], [p[k] for p in loops]
        ratios = [a / b for a, b in zip(fit, loop)]
        print(f"{clock}: Trainer.fit {statistics.median(fit):.2f} s, plain loop {statistics.median(loop):.2f} s "
              f"({args.epochs} epochs, about {steps} steps)")
        print(f"Lightning overhead ({clock}): {statistics.median(ratios):.3f}x (median of {args.repeats} alternating "
              f"pairs; range {min(ratios):.3f}-{max(ratios):.3f}); "
              f"{1000 * (statistics.median(fit) - statistics.median(loop)) / steps:.2f} ms per step")


if __name__ == "__main__":
    main()

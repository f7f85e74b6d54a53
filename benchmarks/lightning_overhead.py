"""Lightning's own overhead: ``Trainer.fit`` of ``ImageClassifier`` / a plain PyTorch loop, measured in one run.

Both train the same model (same initial weights), with the same optimiser and schedule
(``ImageClassifier.optimizer_and_schedule``), the same augmentation (``ImageClassifier.augment``: keyed crop/flip), on batches from
the same training loader, for the same epochs. The fit is configured as a library run is (no logger,
progress bar, checkpoint or validation); ``training_step`` logs the loss and updates the accuracy metric as
always. The plain loop is ``zero_grad / forward / cross-entropy / backward / step`` and a scheduler step per
epoch. Fits and loops alternate (ABBA), and the median of the per-pair ratios is reported, of wall-clock time and
of this process's CPU time (which other processes on a shared machine disturb less).

A shared machine's speed can drift by 2x between runs of a few seconds, more than the overhead measured. So each
fit also runs a plain-loop step after each of its own steps (``StepPairs``), and the ratio of these interleaved
steps is reported too: Lightning's per-step cost, without the fit's one-off setup and teardown, reported apart.

    python benchmarks/lightning_overhead.py                   # digits 16x16, small CNN width 16, batch 64, 8 epochs
    python benchmarks/lightning_overhead.py --repeats 5 --threads 1
    python benchmarks/lightning_overhead.py --module bare     # Lightning's floor: the plain loop's step as a module
    python benchmarks/lightning_overhead.py --module bare --barebones   # the same in Trainer(barebones=True)

``--module bare`` fits a bare ``LightningModule`` whose ``training_step`` is the plain loop's step (the same network,
augmentation, optimiser and schedule; no logging, no accuracy count): what any module pays for Lightning's loop.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F

from lightning_defense.core.batch import unpack_batch
from lightning_defense.core.host_memory import reuse_freed_memory
from lightning_defense.datamodules import DigitsDataModule
from lightning_defense.models import ImageClassifier


def build(args):
    dm = DigitsDataModule(image_size=args.image_size, batch_size=args.batch_size, seed=0)
    dm.setup("fit")
    torch.manual_seed(0)
    model = ImageClassifier("small_cnn", num_classes=10, in_chans=1, lr=0.05, flip=False, crop_padding=2,
                            backbone_kwargs={"width": args.width}, augment_seed=0)
    return dm, model


class BareModule(L.LightningModule):
    """The plain loop's step as a ``LightningModule``: Lightning's own per-step cost with nothing of ours in it."""

    def __init__(self, model: ImageClassifier, epochs: int) -> None:
        super().__init__()
        self.model, self.epochs = model, epochs
        self.model._augment_seed = 0  # as the plain loop's: crops keyed by (seed 0, epoch 0, batch_idx)

    def training_step(self, batch, batch_idx: int):
        x, y, _ = unpack_batch(batch)
        return F.cross_entropy(self.model(self.model.augment(x, batch_idx)), y)

    def configure_optimizers(self):
        optimizer, scheduler, interval = self.model.optimizer_and_schedule(self.epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}


class PlainLoop:
    """``zero_grad / forward / cross-entropy / backward / step`` on its own copy of the model and its own loader."""

    def __init__(self, args) -> None:
        dm, self.model = build(args)
        self.device = torch.device(args.device)
        self.model = self.model.to(self.device)
        self.loader = dm.train_dataloader()
        self.optimizer, self.scheduler, _ = self.model.optimizer_and_schedule(args.epochs)
        self.model._augment_seed = 0
        self.model.train()
        self.batches, self.epochs_done = None, 0

    def train_step(self, batch_idx: int, batch) -> None:
        x, y, _ = unpack_batch(batch)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        x = self.model.augment(x, batch_idx)
        loss = F.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def epoch_batches(self, epoch: int):
        """``(batch_idx, batch)`` of epoch ``epoch``, shuffled as the fit shuffles it."""
        self.loader.sampler.set_epoch(epoch)
        return enumerate(self.loader)

    def epoch(self, epoch: int) -> None:
        for batch_idx, batch in self.epoch_batches(epoch):
            self.train_step(batch_idx, batch)
        self.scheduler.step()

    def step(self) -> float:
        """Train on the next batch (starting the next epoch where one ends); its wall-clock seconds."""
        start = time.perf_counter()
        item = next(self.batches, None) if self.batches is not None else None
        if item is None:
            if self.batches is not None:
                self.scheduler.step()
                self.epochs_done += 1
            self.batches = self.epoch_batches(self.epochs_done)
            item = next(self.batches)
        self.train_step(*item)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


class StepPairs(L.Callback):
    """Runs a plain-loop step after each fit step: a fit step is the time between two plain-loop steps.

    Each pair is milliseconds apart, so a shared machine's drift, which can reach 2x between runs of a few
    seconds, falls on both alike. Lightning's per-step work (hooks, fetcher, closure, logging) lies between two
    ``on_train_batch_end`` calls, so it is all in the fit's steps; the fit's setup and teardown are outside them.
    """

    def __init__(self, loop: PlainLoop) -> None:
        self.loop, self.pairs, self.resumed = loop, [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()  # the fit step's kernels belong to its time, not to the plain-loop step's
        fit_step = time.perf_counter() - self.resumed if self.resumed is not None else None
        loop_step = self.loop.step()
        if fit_step is not None:
            self.pairs.append((fit_step, loop_step))
        self.resumed = time.perf_counter()


def lightning_fit(args, pairs: StepPairs | None = None) -> tuple[float, float]:
    dm, model = build(args)
    if args.module == "bare":
        model = BareModule(model, args.epochs)
    quiet = {"barebones": True} if args.barebones else {  # barebones mode turns these off itself
        "logger": False, "enable_progress_bar": False, "enable_checkpointing": False, "enable_model_summary": False,
        "num_sanity_val_steps": 0}
    trainer = L.Trainer(accelerator=args.device, devices=1, max_epochs=args.epochs, limit_val_batches=0,
                        callbacks=[pairs] if pairs else None, **quiet)
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, datamodule=dm)
    return time.perf_counter() - start, time.process_time() - cpu


def plain_loop(args) -> tuple[float, float]:
    loop = PlainLoop(args)
    start, cpu = time.perf_counter(), time.process_time()
    for epoch in range(args.epochs):
        loop.epoch(epoch)
    if loop.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--module", choices=("image_classifier", "bare"), default="image_classifier",
                        help="the fitted module: ImageClassifier, or the plain loop's step as a bare LightningModule")
    parser.add_argument("--barebones", action="store_true",
                        help="Trainer(barebones=True), Lightning's speed mode (needs --module bare: it refuses self.log)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the Trainer's accelerator)")
    parser.add_argument("--glibc-default", action="store_true",
                        help="leave glibc's allocator as it is (the library's entry points call reuse_freed_memory)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.barebones and args.module != "bare":
        parser.error("--barebones needs --module bare: ImageClassifier calls self.log, which barebones mode refuses")
    if not args.glibc_default:
        reuse_freed_memory()
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
        fitted = f"{args.module}{' (barebones)' if args.barebones else ''}"
        print(f"{clock}: Trainer.fit of {fitted} {statistics.median(fit):.2f} s, plain loop {statistics.median(loop):.2f} s "
              f"({args.epochs} epochs, about {steps} steps)")
        print(f"Lightning overhead ({clock}): {statistics.median(ratios):.3f}x (median of {args.repeats} alternating "
              f"pairs; range {min(ratios):.3f}-{max(ratios):.3f}); "
              f"{1000 * (statistics.median(fit) - statistics.median(loop)) / steps:.2f} ms per step")
    pairs, outside = [], []
    for _ in range(args.repeats):
        clock = StepPairs(PlainLoop(args))
        outside.append(lightning_fit(args, clock)[0] - sum(fit + loop for fit, loop in clock.pairs))
        pairs += clock.pairs
    ratios = [fit / loop for fit, loop in pairs]
    fit, loop = sum(f for f, _ in pairs), sum(p for _, p in pairs)
    print(f"Lightning overhead (interleaved steps, each fit step next to a plain-loop step): {fit / loop:.3f}x in total "
          f"({len(pairs)} pairs: {1000 * fit / len(pairs):.2f} vs {1000 * loop / len(pairs):.2f} ms a step); "
          f"median of the pair ratios {statistics.median(ratios):.3f}x; a fit's time outside these steps (setup, "
          f"first step, teardown): {statistics.median(outside):.2f} s")

if __name__ == "__main__":
    main()

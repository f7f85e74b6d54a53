"""Purification throughput: DiffusionPurifiedDataModule's whole job vs a bare UNet forward loop, same data.

The pipeline adds, per image: the (seed, index)-keyed noise, the x_t/x0 arithmetic, uint8 conversion,
chunk writes and the cache key (hashing the images and the weights). Target: at most 10% slower.

    python benchmarks/purification_throughput.py                         # shipped digits DDPM, CPU
    python benchmarks/purification_throughput.py --arch cifar --device cuda --num-images 50000 --batch-size 512
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from lightning_defense.core.device import autocast
from lightning_defense.core.host_memory import reuse_freed_memory
from lightning_defense.datamodules import DigitsDataModule, ImageDataModule, IndexedDataset
from lightning_defense.datamodules.diffusion_purified import DiffusionPurifiedDataModule
from lightning_defense.diffusion import Denoiser, load_denoiser


class TensorDataModule(ImageDataModule):
    num_classes, num_channels = 10, 0

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__(batch_size=256)
        self.num_channels = images.shape[1]
        labels = torch.zeros(len(images), dtype=torch.long)
        self.train_set = IndexedDataset(images, labels)
        self.val_set = self.test_set = IndexedDataset(images[:1], labels[:1])

    def setup(self, stage=None) -> None:
        pass


def cifar_sized_denoiser() -> Denoiser:
    """google/ddpm-cifar10-32's architecture (35.7M parameters), randomly initialised: same cost, no download."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )
    return Denoiser(unet, DDPMScheduler(1000), source="ddpm-cifar10-32 architecture (random weights)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--denoiser", default="lightning_defense/assets/digits_ddpm")
    parser.add_argument("--arch", choices=["given", "cifar"], default="given", help="cifar: random 35.7M UNet")
    parser.add_argument("--num-images", type=int, default=0, help="0: the digits training split as is")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many interleaved runs")
    parser.add_argument("--steps", type=int, default=1, help="denoiser calls per image: 1 = Hong et al.'s single "
                        "step; ECLIPSE's reverse process from t*=100 is --timestep 100 --steps 100")
    parser.add_argument("--timestep", type=int, default=None, help="start at this timestep instead of sigma's")
    parser.add_argument("--precision", choices=["32", "bf16"], default="32", help="bf16: autocast on a GPU")
    args = parser.parse_args()
    reuse_freed_memory()  # as the command line does

    denoiser = cifar_sized_denoiser() if args.arch == "cifar" else load_denoiser(args.denoiser)
    size, channels = denoiser.sample_size, denoiser.in_channels
    digits = DigitsDataModule(image_size=size, num_channels=channels)
    digits.setup()
    images = digits.train_set.images
    if args.num_images:
        images = images.repeat((args.num_images + len(images) - 1) // len(images), 1, 1, 1)[: args.num_images]
    device = torch.device(args.device)
    model = denoiser.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def bare_loop() -> float:  # the images already in memory, `steps` UNet calls per batch, nothing else
        sync()
        start = time.perf_counter()
        with torch.inference_mode(), autocast(device, args.precision):
            for first in range(0, len(images), args.batch_size):
                x = images[first : first + args.batch_size].to(device)
                for _ in range(args.steps):
                    model(x * 2 - 1, torch.full((len(x),), 10, device=device))
        sync()
        return time.perf_counter() - start

    def pipeline_job() -> float:  # the whole job: key hashing, noise, denoising, uint8, chunk writes, manifest
        with tempfile.TemporaryDirectory() as cache_dir:
            dm = DiffusionPurifiedDataModule(
                TensorDataModule(images), model, sigma=None if args.timestep is not None else args.sigma,
                timestep=args.timestep, steps=args.steps, batch_size=args.batch_size,
                chunk_size=16 * args.batch_size, cache_dir=cache_dir, device=args.device, precision=args.precision,
                progress=False,
            )
            sync()
            start = time.perf_counter()
            dm.purify()
            sync()
            return time.perf_counter() - start

    bare_loop()  # warm-up
    times = [(bare_loop(), pipeline_job()) for _ in range(args.repeats)]  # interleaved: shared machines drift
    bare, pipeline = min(t[0] for t in times), min(t[1] for t in times)

    n = len(images)
    print(f"denoiser: {denoiser.source}  images: {n} x {tuple(images.shape[1:])}  batch: {args.batch_size}  "
          f"device: {device}  steps: {args.steps}  precision: {args.precision}  torch threads: {torch.get_num_threads()}")
    print(f"bare UNet forward loop : {n / bare:9.1f} images/s ({bare:.2f} s)")
    print(f"purification pipeline : {n / pipeline:9.1f} images/s ({pipeline:.2f} s)")
    print(f"pipeline / bare time  : {pipeline / bare:.3f}  (target <= 1.10; best of {args.repeats} interleaved runs)")


if __name__ == "__main__":
    main()

"""Denoising error of a DDPM over Hong et al.'s sigma grid: RMSE of single-step denoising against the clean image,
beside the RMSE of the noisy image it starts from.

Each test image gets Gaussian noise of std sigma in [0, 1] pixels, keyed by ``(seed, index)`` as in
``DiffusionPurifiedDataModule``, and is denoised in one step from GETTIMESTEP(sigma). A useful denoiser brings
the error well below sigma; the identity (Gaussian-only smoothing) keeps it at sigma.

    python benchmarks/denoiser_rmse.py --denoiser runs/fashion_mnist/ddpm --data fashion_mnist --image-size 14
    python benchmarks/denoiser_rmse.py --denoiser lightning_defense/assets/digits_ddpm --data digits --image-size 16
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_defense.core.host_memory import reuse_freed_memory
from lightning_defense.core.rng import per_sample_normal
from lightning_defense.datamodules import DigitsDataModule, FashionMNISTDataModule
from lightning_defense.diffusion import load_denoiser, noise_and_denoise, timestep_for_sigma


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--denoiser", required=True)
    parser.add_argument("--data", choices=["fashion_mnist", "digits"], default="fashion_mnist")
    parser.add_argument("--image-size", type=int, default=14)
    parser.add_argument("--num-images", type=int, default=1000, help="the first test images")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    reuse_freed_memory()  # as the command line does
    data = (FashionMNISTDataModule(image_size=args.image_size) if args.data == "fashion_mnist"
            else DigitsDataModule(image_size=args.image_size))
    data.setup("test")
    images = data.test_set.tensors()[0][: args.num_images] if hasattr(data.test_set, "tensors") else None
    indices = torch.arange(len(images))
    denoiser = load_denoiser(args.denoiser)
    print(f"| sigma | t* | RMSE of x + sigma*eps | RMSE of it clipped to [0, 1] | RMSE after single-step denoising | s |")
    print("|---|---|---|---|---|---|")
    for sigma in args.sigmas:
        t_star = timestep_for_sigma(denoiser.alphas_cumprod, sigma)
        noisy = images + sigma * per_sample_normal(args.seed, indices, tuple(images.shape[1:]))
        start = time.perf_counter()
        with torch.inference_mode():
            denoised = torch.cat([
                noise_and_denoise(denoiser, images[i:i + 256], indices[i:i + 256], denoiser.alphas_cumprod, t_star,
                                  sigma, args.seed, 1, denoiser.variance_type)
                for i in range(0, len(images), 256)])
        seconds = time.perf_counter() - start

        def rmse(x):
            return float((x - images).pow(2).flatten(1).mean(1).sqrt().mean())

        print(f"| {sigma:g} | {t_star} | {rmse(noisy):.4f} | {rmse(noisy.clamp(0, 1)):.4f} | {rmse(denoised):.4f} "
              f"| {seconds:.1f} |")
    print(f"\n{len(images)} {args.data} test images at {args.image_size}x{args.image_size}, denoiser {args.denoiser}; "
          "RMSE per image in [0, 1] pixels, averaged over the images")


if __name__ == "__main__":
    main()

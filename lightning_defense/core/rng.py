"""One source of keyed random streams: a stream is named by integers (seed, sample or model index, purpose).

A sample's noise depends only on its key, never on the batch, the order or the number of processes, so
sharded work gives identical bytes. Streams are NumPy ``SeedSequence``/``PCG64`` generators: one per
sample, which is what makes a draw addressable by index (the per-sample set-up costs microseconds, far
below the draw itself).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

#: Purposes of the keyed streams. A per-sample stream ``(seed, index)`` with no purpose is the Gaussian
#: noise of training-data smoothing and diffusion denoising (stream i > 0: reverse-process step i).
FRIENDS_INIT = 0xF1E


def seed_for(*keys: int) -> int:
    """A 63-bit seed for the stream named by ``keys`` (e.g. ``(seed, model index, purpose)``)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded from the stream named by ``keys``."""
    return torch.Generator(device=device).manual_seed(seed_for(*keys))


def _per_sample(keys: tuple[int, ...], indices: Tensor, shape: tuple[int, ...],
                draw: Callable[[np.random.Generator], np.ndarray]) -> Tensor:
    out = np.empty((len(indices), *shape), dtype=np.float32)
    seed, extra = int(keys[0]), [int(k) for k in keys[1:]]
    for row, index in enumerate(indices.tolist()):
        out[row] = draw(np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, int(index), *extra]))))
    return torch.from_numpy(out)


def per_sample_normal(seed: int, indices: Tensor, shape: tuple[int, ...], stream: int = 0) -> Tensor:
    """Standard normal noise for each sample index, from the stream keyed by ``(seed, index[, stream])``.

    ``stream > 0`` gives further independent draws for the same sample (one per reverse-diffusion step).
    """
    keys = (seed, stream) if stream else (seed,)
    return _per_sample(keys, indices, shape, lambda rng: rng.standard_normal(shape, dtype=np.float32))


def per_sample_uniform(seed: int, indices: Tensor, shape: tuple[int, ...], bound: float,
                       stream: int = FRIENDS_INIT) -> Tensor:
    """U(-bound, bound) noise for each sample index, from the stream keyed by ``(seed, index, stream)``."""
    return _per_sample((seed, stream), indices, shape,
                       lambda rng: rng.uniform(-bound, bound, size=shape).astype(np.float32))

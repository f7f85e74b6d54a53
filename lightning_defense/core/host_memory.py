"""Host memory that CPU training reuses instead of faulting in again every step.

glibc's allocator serves blocks above a threshold (128 KiB, rising to the largest block freed) with ``mmap`` and
returns them on free, and it hands free memory at the top of the heap back to the OS once that exceeds twice the
threshold. A CPU training step frees and reallocates its activations and gradients every step, so each step maps
and zero-fills the same pages again: on the digits CNN, 50 to 3,500 page faults a step (glibc's adaptation varies
from process to process), which make a fit 1.3-1.5x slower (BENCHMARKS.md, "Host memory"). Blocks above 32 MiB,
which that adaptation never reaches, are mapped afresh every time. :func:`reuse_freed_memory` raises both
thresholds once, so freed blocks are reused; the process keeps the heap it has used at its peak. GPU training
allocates little host memory and is not changed.

The command line and the benchmarks call it at start; a script of one's own calls it once, before training::

    from lightning_defense.core.host_memory import reuse_freed_memory

    reuse_freed_memory()
"""

from __future__ import annotations

import ctypes
import os
import platform

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: Blocks above this (a dataset held in memory, say) still come from ``mmap`` and go back to the OS when freed; at
#: most this much free memory is kept at the top of the heap. A CPU step's activations are far smaller.
THRESHOLD = 256 << 20
#: glibc's own settings of the same thresholds: where a user set one, their choice stands.
GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_tuned = False


def reuse_freed_memory() -> bool:
    """Keep freed host memory for reuse (glibc only; once per process). Whether the allocator is tuned.

    Does nothing where the C library is not glibc (macOS, Windows, musl) or where ``MALLOC_MMAP_THRESHOLD_`` or
    ``MALLOC_TRIM_THRESHOLD_`` is set in the environment.
    """
    global _tuned
    if _tuned:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in GLIBC_VARIABLES):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
    return _tuned

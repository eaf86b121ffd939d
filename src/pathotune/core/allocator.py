"""Keep freed CPU memory in the process for reuse, so a forward does not page-fault its buffers in afresh.

glibc's malloc hands large blocks straight to ``mmap`` and returns them to the kernel on ``free``, and trims the
heap top past a threshold; both thresholds move as the program runs. A ViT forward frees and re-allocates tens of
megabytes per block, so on the CPU the kernel maps and zeroes the same pages again on every block: 80,000+ minor
page faults per batch of 16 at 224 px for the default preset, about a tenth of its time (BENCHMARKS.md §1).
PyTorch's CPU tuning guide swaps in jemalloc or tcmalloc for the same reason; two ``mallopt`` calls get the same
effect from the allocator already loaded. The price: the process keeps its peak heap until it exits. That suits a
CLI run, so the CLI does it; importing the library never changes the process's allocator.
"""

from __future__ import annotations

import ctypes
import os
import platform

# glibc's mallopt parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

OPT_OUT = "PATHOTUNE_MALLOC"
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_state: dict[str, bool] = {}


def allocator_note() -> str:
    """How this process allocates CPU memory, for benchmark output: 'glibc, freed memory kept', 'glibc' or the
    preloaded allocator."""
    preload = os.environ.get("LD_PRELOAD", "")
    other = next((a for a in _OTHER_ALLOCATORS if a in preload), None)
    if other:
        return other
    return "glibc, freed memory kept" if _state.get("retained") else platform.libc_ver()[0] or "system"


def retain_freed_memory() -> bool:
    """Make glibc keep freed blocks for reuse (no mmap per large block, no heap trimming). Returns whether it did.

    Does nothing off glibc, when the user has already chosen (``MALLOC_*_`` or ``GLIBC_TUNABLES`` set, or another
    allocator in ``LD_PRELOAD``), or with ``PATHOTUNE_MALLOC=system``.
    """
    if "retained" in _state:
        return _state["retained"]
    chosen = any(os.environ.get(k) for k in _USER_SETTINGS) or any(
        a in os.environ.get("LD_PRELOAD", "") for a in _OTHER_ALLOCATORS
    )
    ok = False
    if platform.libc_ver()[0] == "glibc" and not chosen and os.environ.get(OPT_OUT, "").lower() != "system":
        mallopt = ctypes.CDLL(None).mallopt
        # Older glibc caps the mmap threshold at half its 64 MiB heap size: fall back to that.
        ok = bool(mallopt(M_MMAP_THRESHOLD, 1 << 30) or mallopt(M_MMAP_THRESHOLD, 1 << 25))
        ok = ok and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))
    _state["retained"] = ok
    return ok

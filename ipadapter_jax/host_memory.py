"""Keep the host memory a CPU training step frees, so that the next step reuses it instead of faulting in fresh
pages.

XLA:CPU allocates each run's temporary buffer on a worker thread (4.4 GiB for an SD1.5 training step at batch 2).
glibc serves an allocation that large from a fresh `mmap` (a worker thread's own arena always falls back to one)
and unmaps it when freed, so every step faults in about 1.2 million new 4 KiB pages: 5-6 s of kernel time per
step on a 2-core VM, 7-10% of the step. With one malloc arena, no mmap'd chunks and no trimming, the pages one step
frees serve the next: no faults after the first steps.

The price is resident memory: glibc may place a small allocation in the freed block, and the next step's buffer
then takes fresh memory beside it, so the process can hold up to one more step's temporaries (SD1.5 at batch 2:
13.5 instead of 9.4 GiB peak). Hence two stages:
- `share_one_arena()`, before JAX starts its threads, only in processes that ask for the CPU set-up (the CLI,
  our benchmark sides, and library users who call `xla_flags.configure_xla_for_cpu`); never on library import;
- `retain_freed_memory(temp_bytes)`, once the step is compiled (`training/loop.py`), which keeps freed memory only
  in such a process and only when the machine has room for a second copy of the step's temporaries.
Opt out with IPADAPTER_JAX_RETAIN_MEMORY=0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_MARGIN_BYTES = 2**30  # left free beyond two copies of the step's temporaries

_arena_shared = False


def _mallopt():
    if os.environ.get("IPADAPTER_JAX_RETAIN_MEMORY", "1") == "0":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl has mallopt but ignores these parameters
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt


def share_one_arena() -> bool:
    """One malloc arena for every thread, so that big blocks come from the main heap, which can keep freed memory
    (a thread's own arena cannot). Must run before JAX's threads first allocate: a thread keeps its arena."""
    global _arena_shared
    mallopt = _mallopt()
    _arena_shared = mallopt is not None and mallopt(M_ARENA_MAX, 1) == 1
    return _arena_shared


def available_bytes() -> int | None:
    """The kernel's estimate of memory available without swapping (Linux), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def retain_freed_memory(temp_bytes: int) -> bool:
    """Keep freed blocks mapped for reuse (no mmap'd chunks, no trimming) when this process shares one arena and
    the machine has room for two copies of a step's `temp_bytes` of temporaries; True when it did."""
    available = available_bytes()
    if not _arena_shared or available is None or available < 2 * temp_bytes + _MARGIN_BYTES:
        return False
    mallopt = _mallopt()
    # -1 reads as the largest size_t: trimming never happens.
    return mallopt is not None and mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1

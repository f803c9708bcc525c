"""XLA flags for processes that ask for them: the CLI, the benchmarks, and library users who call
`configure_xla_for_cpu`; never applied on library import.

Must run before JAX starts its backends (the first device query, array or compile); importing jax earlier is fine.
"""

from __future__ import annotations

import os
import sys

# Sends convolutions to Eigen while matmuls stay in YNNPACK: 1.2-1.4x on the SD UNet under XLA:CPU (jaxlib 0.10).
CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=individual_dot,dot,reduce",)


def _has_accelerator() -> bool:
    return any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/accel0", "/dev/vfio/0"))


def backends_started() -> bool:
    """Whether JAX has created its backends in this process (XLA reads XLA_FLAGS then, and starts its threads).
    Importing jax, flax or this library does not start them. If this jax cannot say (its private module
    moved), assume they have: the set-up then stands down, as it did whenever jax was imported."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return True


def configure_xla_for_cpu() -> str:
    """Add the CPU flags and share one malloc arena (`host_memory.py`: lets a training step keep the memory it
    frees), unless an accelerator is present, the user opted out (IPADAPTER_JAX_CPU_FLAGS=0 for both), or JAX has
    already started its backends (then neither can take effect any more). Returns which: "applied", "opted out",
    "accelerator" or "too late"."""
    if os.environ.get("IPADAPTER_JAX_CPU_FLAGS", "1") == "0":
        return "opted out"
    if _has_accelerator():
        return "accelerator"
    if backends_started():
        return "too late"
    from ipadapter_jax.host_memory import share_one_arena

    share_one_arena()
    current = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in CPU_FLAGS if f.split("=")[0] not in current]
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
    return "applied"


def cpu_has_bfloat16() -> bool | None:
    """Whether this host's CPU has bfloat16 instructions (AVX512-BF16 or AMX-BF16; None: cannot tell). With them,
    XLA:CPU's bfloat16 matrix products run about twice as fast as float32 ones."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = {word for line in f if line.startswith("flags") for word in line.split(":", 1)[1].split()}
    except OSError:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16"}) if flags else None

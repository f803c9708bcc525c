"""Shared benchmark plumbing.

Each side (this project, the PyTorch reference) runs in its own process: XLA's and PyTorch's thread pools
in one process spin against each other on a small CPU and distort both timings. `alternate` runs the sides in
turn for a few rounds, so load from elsewhere on the machine falls on both alike (unet_step.py); the longer
benchmarks run each side once with several timed repeats. All report medians.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# AMD's family numbers by core generation (family 25 covers Zen 3 and Zen 4: told apart by model range).
_AMD_FAMILIES = {23: "Zen/Zen 2", 26: "Zen 5"}
_ZEN4_MODELS = (range(0x10, 0x20), range(0x60, 0x80), range(0xA0, 0xB0))


def host_cpu(cpuinfo: str | None = None) -> str:
    """This machine's CPU in one phrase for a benchmark's header, e.g. "AMD EPYC (Zen 5: family 26, model 2), 2
    CPUs, AVX-512 with BF16" (from /proc/cpuinfo, or the text given): ratios against PyTorch differ between CPU
    generations of the same name, so every quoted number names the generation."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            import platform

            return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    info: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip() and info:
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    name = info.get("model name", "unknown CPU")
    family, model = int(info.get("cpu family", "0")), int(info.get("model", "0"))
    generation = ""
    if info.get("vendor_id") == "AuthenticAMD":
        if family == 25:
            generation = "Zen 4" if any(model in r for r in _ZEN4_MODELS) else "Zen 3"
        else:
            generation = _AMD_FAMILIES.get(family, "")
    flags = set(info.get("flags", "").split())
    vector = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
    if flags & {"avx512_bf16", "amx_bf16"}:
        vector += " with BF16" + (" and AMX" if "amx_bf16" in flags else "")
    where = f"{generation}: family {family}, model {model}" if generation else f"family {family}, model {model}"
    return f"{name} ({where}), {os.cpu_count()} CPUs, {vector}"


def configure_xla_for_cpu() -> None:
    """The CLI's XLA:CPU set-up for this side's process; a side that started JAX before calling this would time
    something users never run, so it stops."""
    from ipadapter_jax.xla_flags import configure_xla_for_cpu as configure

    if configure() == "too late":
        raise SystemExit("bench: JAX started its backends before configure_xla_for_cpu(); call it first in the side.")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def emit(result: dict) -> None:
    """A side's report to the driver: one JSON line."""
    print("SIDE " + json.dumps(result), flush=True)


def run_side(script: Path, argv: list[str], side: str) -> dict:
    cmd = [sys.executable, str(script), *argv, "--side", side]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SIDE ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{side} side failed ({proc.returncode})")
    return json.loads(lines[-1][5:])


def alternate(script: Path, argv: list[str], rounds: int, sides=("ours", "reference")) -> dict[str, list[dict]]:
    """Run every side `rounds` times, alternating; returns each side's reports in order."""
    out: dict[str, list[dict]] = {s: [] for s in sides}
    for _ in range(rounds):
        for side in sides:
            out[side].append(run_side(script, argv, side))
    return out


def median_of(reports: list[dict], key: str = "times") -> tuple[float, list[float]]:
    times = [t for r in reports for t in r[key]]
    return statistics.median(times), times

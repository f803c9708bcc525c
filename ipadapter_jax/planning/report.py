"""What the TPU compiler says about a compiled program: per-chip HBM against the chip's capacity, FLOPs, its
own run-time estimate (`optimal_seconds`), and the share of custom (Pallas) kernels, read from the costs they
declare in the compiled HLO. Every time and MFU here is the compiler's estimate, not a measurement."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from ipadapter_jax.planning import ops
from ipadapter_jax.planning.topology import Topology

_COST = re.compile(r'"cost_estimate":\{"flops":"(\d+)","transcendentals":"(\d+)","bytes_accessed":"(\d+)"')
_USEFUL = re.compile(r'"useful_flops":"(\d+)"')
_LAYOUT = re.compile(r'"layout":"(\w+)"')
_NAME = re.compile(r"%([\w.\-]+) = .*custom-call\(", re.DOTALL)
_INSTRUCTION = re.compile(r"\n(?=\s*(?:ROOT\s+)?%[\w.\-]+ = )")


@dataclasses.dataclass
class KernelCost:
    calls: int = 0
    flops: float = 0.0  # as declared: the matrix-unit work issued, padding included
    useful_flops: float = 0.0  # the attention math at its real sizes
    bytes: float = 0.0
    layout: str = ""  # the attention kernels' head layout, "rows" or "lanes" ("mixed": both in one program)


def kernel_costs(hlo_text: str) -> dict[str, KernelCost]:
    """Declared costs of every custom kernel call in a compiled module's text, by kernel name."""
    out: dict[str, KernelCost] = {}
    # One chunk per instruction: a kernel's metadata attribute spans several lines.
    for line in _INSTRUCTION.split(hlo_text):
        if "custom-call(" not in line or "cost_estimate" not in line:
            continue
        name = _NAME.search(line)
        kernel = re.sub(r"(\.\d+)+$", "", name.group(1)) if name else "custom"
        cost = _COST.search(line)
        useful = _USEFUL.search(line)
        k = out.setdefault(kernel, KernelCost())
        k.calls += 1
        k.flops += float(cost.group(1))
        k.bytes += float(cost.group(3))
        k.useful_flops += float(useful.group(1)) if useful else float(cost.group(1))
        layout = _LAYOUT.search(line)
        if layout:
            k.layout = layout.group(1) if k.layout in ("", layout.group(1)) else "mixed"
    return out


@dataclasses.dataclass
class Estimate:
    """One program on one topology, per chip unless named otherwise."""

    program: str
    topology: str
    accelerator_type: str
    mesh: dict[str, int]
    batch_per_chip: float
    compile_seconds: float
    hbm_capacity_bytes_per_chip: int
    hbm_argument_bytes: int
    hbm_output_bytes: int
    hbm_alias_bytes: int
    hbm_temp_bytes: int
    hbm_code_bytes: int
    flops_per_chip_step: float  # the compiler's count, custom kernels at their declared (issued) FLOPs
    model_flops_per_chip_step: float  # the same with custom kernels at their useful FLOPs: what MFU counts
    bytes_accessed_per_chip_step: float
    est_step_s: float  # the compiler's optimal_seconds
    peak_flops_per_chip: float
    items_per_step: int  # examples trained or images made per step, whole slice
    unet_calls_per_item: int  # denoising steps per image (1 for training)
    kernels: dict[str, KernelCost]
    total_steps: int | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    remat: str | None = None  # training: the remat policy compiled
    # Training under remat: the share of the compiled FLOPs that recompute the forward (traced, planning/flops.py),
    # left out of model_flops_per_chip_step.
    recompute_share: float = 0.0
    # Share of the compiler's step estimate by kind of operation (planning/ops.py: per-operation rooflines, the
    # kernels at their declared costs, and what neither accounts for): where the step goes.
    time_by_kind: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def hbm_used_bytes_per_chip(self) -> int:
        return (self.hbm_argument_bytes + self.hbm_output_bytes - self.hbm_alias_bytes + self.hbm_temp_bytes
                + self.hbm_code_bytes)

    @property
    def fits(self) -> bool:
        return self.hbm_used_bytes_per_chip <= self.hbm_capacity_bytes_per_chip

    @property
    def est_mfu(self) -> float:
        return self.model_flops_per_chip_step / self.est_step_s / self.peak_flops_per_chip

    @property
    def images_per_s(self) -> float:
        return self.items_per_step / (self.est_step_s * self.unet_calls_per_item)

    @property
    def kernel_time_share(self) -> float:
        """Custom kernels' share of the step at their declared costs, priced as the compiler prices them."""
        return self.kernel_seconds / self.est_step_s if self.est_step_s else 0.0

    # The rates the compiler prices declared kernel costs at (the chip's peaks times Chip.compiler_*_share)
    kernel_peak_bytes_per_s: float = 0.0
    kernel_flops_per_s: float = 0.0

    @property
    def kernel_seconds(self) -> float:
        bw = self.kernel_peak_bytes_per_s or float("inf")
        rate = self.kernel_flops_per_s or self.peak_flops_per_chip
        return sum(max(k.flops / rate, k.bytes / bw) for k in self.kernels.values())

    @property
    def est_total_hours(self) -> float | None:
        if self.total_steps is None:
            return None
        return self.total_steps * self.est_step_s / 3600

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "kernels"}
        out["kernels"] = {k: dataclasses.asdict(v) for k, v in self.kernels.items()}
        for name in ("fits", "hbm_used_bytes_per_chip", "est_mfu", "images_per_s", "kernel_time_share",
                     "est_total_hours"):
            out[name] = getattr(self, name)
        out["estimates_are"] = "the TPU compiler's cost model (compiled.cost_analysis), not measurements"
        return out


def analyse(program, compiled, topology: Topology, compile_seconds: float, *, total_steps: int | None = None,
            notes: list[str] | None = None) -> Estimate:
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    text = compiled.as_text()
    kernels = kernel_costs(text)
    op_list = ops.op_costs(text)
    flops = float(cost.get("flops", 0.0))
    model_flops = flops - sum(k.flops - k.useful_flops for k in kernels.values())
    mesh = program.mesh
    notes = list(notes or [])
    seconds = float(cost.get("optimal_seconds", 0.0))
    if seconds < 0:
        # This libtpu prices an operation it cannot model at -1 s. On v5e and v6e every one seen so far is a
        # ConcatBitcast join of prefetched slices (free in fact: ops.unpriced_joins). A step under a second with
        # N of them reads between -N and 1 - N: add N back, pricing them at 0; any others leave a bound.
        unpriced = math.ceil(-seconds)
        seconds += unpriced
        joins = min(ops.unpriced_joins(text), unpriced)  # bitcasts: free in fact
        if joins:
            notes.append(f"{joins} ConcatBitcast operation(s) carry no price on this chip (-1 s each); they view "
                         "slices of a prefetched array as one buffer without moving data, so they count as 0 s")
        if unpriced > joins:
            notes.append(f"the compiler could not price {unpriced - joins} operation(s) on this chip (it returns -1 "
                         "s for each); they are counted as free, so the time is a lower bound and MFU an upper bound")
    estimate = Estimate(
        program=program.name, topology=topology.name, accelerator_type=topology.accelerator_type,
        mesh={str(a): int(n) for a, n in mesh.shape.items()},
        batch_per_chip=program.items_per_step / mesh.size, compile_seconds=compile_seconds,
        hbm_capacity_bytes_per_chip=topology.chip.hbm_bytes,
        hbm_argument_bytes=int(memory.argument_size_in_bytes), hbm_output_bytes=int(memory.output_size_in_bytes),
        hbm_alias_bytes=int(memory.alias_size_in_bytes), hbm_temp_bytes=int(memory.temp_size_in_bytes),
        hbm_code_bytes=int(memory.generated_code_size_in_bytes),
        flops_per_chip_step=flops, model_flops_per_chip_step=model_flops,
        bytes_accessed_per_chip_step=float(cost.get("bytes accessed", 0.0)),
        est_step_s=seconds, peak_flops_per_chip=topology.chip.peak_bf16_flops,
        items_per_step=program.items_per_step, unet_calls_per_item=program.unet_calls, kernels=kernels,
        total_steps=total_steps, notes=notes,
        kernel_peak_bytes_per_s=topology.chip.hbm_bytes_per_s * topology.chip.compiler_bytes_share,
        kernel_flops_per_s=topology.chip.peak_bf16_flops * topology.chip.compiler_flops_share)
    by_kind = ops.summary(op_list, topology.chip, seconds, kernel_seconds=estimate.kernel_seconds)["by_kind"]
    estimate.time_by_kind = {k: v["share"] for k, v in by_kind.items()}
    return estimate


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def table(e: Estimate) -> str:
    """A human-readable summary; every time and rate is labelled as the compiler's estimate."""
    rows = [
        ("program", e.program),
        ("topology", f"{e.accelerator_type} ({e.topology}), mesh {e.mesh}, {e.batch_per_chip:g} per chip"
                     + (f", remat {e.remat}" if e.remat else "")),
        ("fits in HBM", "yes" if e.fits else "NO"),
        ("HBM per chip", f"{_gib(e.hbm_used_bytes_per_chip)} of {_gib(e.hbm_capacity_bytes_per_chip)} "
                         f"(arguments {_gib(e.hbm_argument_bytes)}, temporaries {_gib(e.hbm_temp_bytes)}, "
                         f"outputs {_gib(e.hbm_output_bytes - e.hbm_alias_bytes)} not aliased)"),
        ("FLOPs per chip per step", f"{e.model_flops_per_chip_step / 1e12:.3f} TFLOP (model) / "
                                    f"{e.flops_per_chip_step / 1e12:.3f} TFLOP issued"),
        ("step time (compiler's estimate)", f"{e.est_step_s * 1e3:.2f} ms"),
        ("MFU (compiler's estimate)", f"{100 * e.est_mfu:.1f}% of {e.peak_flops_per_chip / 1e12:.0f} TFLOP/s bf16"),
        ("custom kernels (declared)", f"{100 * e.kernel_time_share:.1f}% of the step, "
                                      + (", ".join(f"{n} x{k.calls}" + (f" ({k.layout})" if k.layout else "")
                                                  for n, k in e.kernels.items()) or "none")),
        ("where the step goes (estimate)", ", ".join(f"{k} {100 * v:.0f}%" for k, v in e.time_by_kind.items())),
        ("images/s, whole slice (estimate)", f"{e.images_per_s:,.1f}"),
        ("compile time", f"{e.compile_seconds:.0f} s"),
    ]
    if e.est_total_hours is not None:
        rows.append((f"{e.total_steps} steps (estimate)", f"{e.est_total_hours:.1f} h"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines += [f"note: {n}" for n in e.notes]
    return "\n".join(lines)


def dumps(e: Estimate) -> str:
    return json.dumps(e.to_json(), indent=1)

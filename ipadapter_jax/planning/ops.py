"""Where the TPU compiler's estimate of a step goes: every scheduled XLA operation of a compiled module carries
the compiler's own `estimated_cycles` in its backend config; `op_costs` reads them with what the operation is (a
convolution, a matrix product, an elementwise loop, a layout copy, a collective), its output shape and layout,
and the jax operation it came from, and `summary` groups them. Custom (Pallas) kernels carry no cycles, only the
costs they declare: the caller passes their share of the step (planning/report.py prices them at the chip's
peaks) and the XLA operations share the rest by their cycles. Cycles are the compiler's estimate, not a
measurement.
"""
from __future__ import annotations

import dataclasses
import re
from collections import defaultdict

_INSTRUCTION = re.compile(r"\n(?=\s*(?:ROOT\s+)?%[\w.\-]+ = )")
_HEAD = re.compile(r"\s*(?:ROOT\s+)?%([\w.\-]+) = (\([^=]*?\)|\S+?)(\{[^}]*\})? ([\w\-]+)\(")  # tuple or array
_CYCLES = re.compile(r'"estimated_cycles":"(-?\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_COMPUTATION = re.compile(r"\n(?=(?:ENTRY )?%[\w.\-]+ \(.*\) -> .* \{)")


@dataclasses.dataclass(frozen=True)
class OpCost:
    name: str  # the HLO instruction
    kind: str  # convolution, matmul, loop (elementwise / reduction), kernel, copy, collective, other
    cycles: int  # the compiler's estimate; -1 where it could not price the operation, or for a custom kernel
    shape: str  # output type and layout, e.g. bf16[8,64,64,320]{3,0,2,1:T(8,128)(2,1)}
    source: str  # the jax operation (metadata op_name), shortened


def _computations(text: str) -> dict[str, str]:
    out = {}
    for chunk in _COMPUTATION.split(text):
        m = re.match(r"(?:ENTRY )?%([\w.\-]+) \(", chunk)
        if m:
            out[m.group(1)] = chunk
    return out


def _conv_kind(conv: str) -> str:
    """A TPU convolution is a real one (a spatial window over a conv_general_dilated), or a matrix product: the
    compiler rewrites dots, and their gradients, as convolutions too."""
    window = re.search(r"window=\{size=([\dx]+)", conv)
    spatial = window is not None and any(int(n) > 1 for n in window.group(1).split("x"))
    return "convolution" if spatial and "dot_general" not in conv else "matmul"


def _kind(opcode: str, body: str) -> str:
    if opcode == "custom-call":
        return "kernel" if "tpu_custom_call" in body or "cost_estimate" in body else "other"
    if opcode == "convolution":
        return _conv_kind(body)
    if opcode == "dot":
        return "matmul"
    if opcode in ("copy", "copy-start", "transpose", "bitcast"):
        return "copy"
    if opcode.startswith(("all-", "reduce-scatter", "collective-permute")):
        return "collective"
    if opcode == "fusion":
        return "fusion"
    return "other"


def op_costs(hlo_text: str) -> list[OpCost]:
    """Every operation of a compiled module that carries an estimate, classified; fusions by what they hold."""
    computations = _computations(hlo_text)
    out = []
    for chunk in _INSTRUCTION.split(hlo_text):
        cycles = _CYCLES.search(chunk)
        head = _HEAD.match(chunk)
        if not head:
            continue
        name, dtype, layout, opcode = head.groups()
        kind = _kind(opcode, chunk)
        if not cycles and kind != "kernel":
            continue
        if kind == "fusion":
            called = _CALLS.search(chunk)
            body = computations.get(called.group(1), "") if called else ""
            if " convolution(" in body:
                kind = _conv_kind(re.search(r"convolution\([^\n]*", body).group(0))
            elif " dot(" in body:
                kind = "matmul"
            elif " all-gather" in body or " all-reduce" in body or " reduce-scatter" in body:
                kind = "collective"
            else:
                kind = "loop"
        source = _OP_NAME.search(chunk)
        src = source.group(1) if source else ""
        src = re.sub(r"jit\([^)]*\)/|jvp\(|transpose\(|checkpoint/|remat/|\)", "", src)[-80:]
        out.append(OpCost(name=name, kind=kind, cycles=int(cycles.group(1)) if cycles else -1,
                          shape=f"{dtype}{layout or ''}",
                          source=src))
    return out


_JOINS = re.compile(r'custom-call\([^\n]*custom_call_target="ConcatBitcast"')


def unpriced_joins(hlo_text: str) -> int:
    """How many `ConcatBitcast` custom calls of a compiled module carry no estimate. The TPU compiler emits them
    to view the slices of an array it prefetched piece by piece (async `slice-start`/`slice-done` into adjacent
    buffers) as one buffer: a bitcast, no data moves. This libtpu prices each one at -1 s on v5e and v6e."""
    return sum(1 for chunk in _INSTRUCTION.split(hlo_text)
               if _JOINS.search(chunk) and not _CYCLES.search(chunk))


def summary(ops: list[OpCost], top: int = 12, kernel_share: float = 0.0) -> dict:
    """Share of the step by kind, the most expensive operations, and the unpriced ones; custom kernels take
    `kernel_share` of the step, the XLA operations the rest in proportion to their cycles."""
    priced = [o for o in ops if o.cycles >= 0]
    cycles = sum(o.cycles for o in priced) or 1
    total = cycles / (1.0 - min(max(kernel_share, 0.0), 0.99))  # cycles the whole step would take
    by_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for o in priced:
        by_kind[o.kind][0] += o.cycles
        by_kind[o.kind][1] += 1
    unpriced: dict[str, int] = defaultdict(int)
    for o in ops:
        if o.cycles < 0 and o.kind != "kernel":
            unpriced[f"{o.kind} {o.source}"] += 1
    kernels = [o for o in ops if o.kind == "kernel" and o.cycles < 0]
    if kernel_share > 0:
        by_kind["kernel"] = [total - cycles, len(kernels)]
    return {
        "total_cycles": cycles,
        "by_kind": {k: {"share": c / total, "ops": n}
                    for k, (c, n) in sorted(by_kind.items(), key=lambda kv: -kv[1][0])},
        "top": [{"name": o.name, "kind": o.kind, "share": o.cycles / total, "shape": o.shape, "source": o.source}
                for o in sorted(priced, key=lambda o: -o.cycles)[:top]],
        "unpriced": dict(sorted(unpriced.items(), key=lambda kv: -kv[1])),
    }

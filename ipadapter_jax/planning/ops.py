"""Where the TPU compiler's estimate of a step goes. Its `optimal_seconds` is a sum over the scheduled operations
of a per-operation roofline: each XLA operation takes max(FLOPs / matrix rate, bytes / HBM rate), at fixed
fractions of the chip's peaks (`Chip.compiler_flops_share`, `Chip.compiler_bytes_share`; checked against the
compiler in tests/planning/tpu_worker.py), and each custom (Pallas) kernel is priced the same way from the costs
it declares. `op_costs` reads every scheduled operation of a compiled module with what it is (a convolution, a
matrix product, an elementwise loop, a layout copy, a collective), its FLOPs (spatial windows counted where they
meet data, as the compiler counts them) and the bytes of its operands and results, its output shape and layout,
the jax operation it came from, and the compiler's own `estimated_cycles` (a separate scheduling model; not what
`optimal_seconds` adds up). `summary` groups their times. All of it is the compiler's estimate, not a
measurement.

The bytes here read each operand once. Where the compiler tiles an operation so that it reads an operand more than
once (smaller activations, that fit its on-chip memory in pieces) it counts more, so the sum is a lower bound:
98% of the SD1.5 training step's XLA time at 32 images per chip on v5p, 78% of a single attention block's at 8
(tests/planning/test_tpu_plan.py); `summary` shows the rest as "unattributed".
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

_INSTRUCTION = re.compile(r"\n(?=\s*(?:ROOT\s+)?%[\w.\-]+ = )")
_HEAD = re.compile(r"\s*(?:ROOT\s+)?%([\w.\-]+) = (\([^=]*?\)|\S+?)(\{[^}]*\})? ([\w\-]+)\(")  # tuple or array
_CYCLES = re.compile(r'"estimated_cycles":"(-?\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_COMPUTATION = re.compile(r"\n(?=(?:ENTRY )?%[\w.\-]+ \(.*\) -> .* \{)")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
             "s64": 8, "u64": 8, "f64": 8}
# Operations that move no data of their own in the compiler's pricing (views, tuples, the halves of async pairs).
_NO_TRAFFIC = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "copy-start", "copy-done",
               "slice-start", "slice-done", "after-all", "partition-id", "replica-id")


@dataclasses.dataclass(frozen=True)
class OpCost:
    name: str  # the HLO instruction
    kind: str  # convolution, matmul, loop (elementwise / reduction), kernel, copy, collective, other
    cycles: int  # the compiler's estimate; -1 where it could not price the operation, or for a custom kernel
    shape: str  # output type and layout, e.g. bf16[8,64,64,320]{3,0,2,1:T(8,128)(2,1)}
    source: str  # the jax operation (metadata op_name), shortened
    flops: float = 0.0  # matrix work of the operation's convolutions and dots (0 for the rest)
    bytes: float = 0.0  # its operands and results

    def seconds(self, chip) -> float:
        """The compiler's roofline for this operation on `chip` (a planning.topology.Chip)."""
        return roofline_seconds(self.flops, self.bytes, chip)


def roofline_seconds(flops: float, nbytes: float, chip) -> float:
    """max(FLOPs, bytes) at the rates the compiler prices them on `chip`: XLA operations and declared kernel
    costs alike."""
    return max(flops / (chip.peak_bf16_flops * chip.compiler_flops_share),
               nbytes / (chip.hbm_bytes_per_s * chip.compiler_bytes_share))


def _array_bytes(types: str) -> int:
    return sum(_ITEMSIZE[dtype] * math.prod(int(n) for n in dims.split(",") if n) for dtype, dims in
               _ARRAY.findall(types))


def _dims(types: str) -> list[int]:
    m = _ARRAY.search(types)
    return [int(n) for n in m.group(2).split(",") if n] if m else []


def _operands(line: str) -> list[str]:
    """The %names an instruction reads (its operand list, up to the matching parenthesis)."""
    head = _HEAD.match(line)
    if not head:
        return []
    args, depth = line[head.end():], 1
    for i, ch in enumerate(args):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return re.findall(r"%([\w.\-]+)", args[:i])
    return re.findall(r"%([\w.\-]+)", args)


def _conv_flops(line: str, types: dict[str, str]) -> float:
    """2 x output elements x input features x the window positions that meet data (padding and dilation
    excluded), over feature groups: what the compiler counts for a convolution, a dot it rewrote as one included."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", line)
    operands = _operands(line)
    head = _HEAD.match(line)
    if not labels or not operands or not head:
        return 0.0
    lhs_labels, out_labels = labels.group(1), labels.group(3)
    lhs, out = _dims(types.get(operands[0], "")), _dims(head.group(2))
    if len(lhs) != len(lhs_labels) or len(out) != len(out_labels):
        return 0.0
    window = re.search(r"window=\{([^}]*)\}", line)
    attrs = dict(kv.split("=", 1) for kv in window.group(1).split()) if window else {}
    spatial = sum(c.isdigit() for c in lhs_labels)

    def field(name, default):
        return attrs[name].split("x") if name in attrs else [default] * spatial

    size, stride = [int(x) for x in field("size", 1)], [int(x) for x in field("stride", 1)]
    lhs_dilate, rhs_dilate = [int(x) for x in field("lhs_dilate", 1)], [int(x) for x in field("rhs_dilate", 1)]
    pad = [tuple(int(y) for y in x.split("_")) for x in field("pad", "0_0")]
    met = 1  # (output position, window position) pairs that read data, per spatial dimension, multiplied
    for d in range(spatial):
        length, outputs = lhs[lhs_labels.index(str(d))], out[out_labels.index(str(d))]
        dilated = (length - 1) * lhs_dilate[d] + 1
        met *= sum(1 for o in range(outputs) for k in range(size[d])
                   if 0 <= (i := o * stride[d] + k * rhs_dilate[d] - pad[d][0]) < dilated and i % lhs_dilate[d] == 0)
    groups = re.search(r"feature_group_count=(\d+)", line)
    batch_and_features = math.prod(n for c, n in zip(out_labels, out, strict=True) if not c.isdigit())
    return 2.0 * batch_and_features * met * lhs[lhs_labels.index("f")] / (int(groups.group(1)) if groups else 1)


def _dot_flops(line: str, types: dict[str, str]) -> float:
    operands, head = _operands(line), _HEAD.match(line)
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
    if not operands or not head:
        return 0.0
    lhs = _dims(types.get(operands[0], ""))
    depth = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i) if contracting else 1
    return 2.0 * math.prod(_dims(head.group(2))) * depth


def _matrix_flops(body: str, types: dict[str, str], computations: dict[str, str]) -> float:
    """FLOPs of the convolutions and dots of a fused computation, nested fusions included."""
    flops = 0.0
    for line in body.split("\n"):
        if " convolution(" in line:
            flops += _conv_flops(line, types)
        elif " dot(" in line:
            flops += _dot_flops(line, types)
        elif " fusion(" in line and (called := _CALLS.search(line)):
            flops += _matrix_flops(computations.get(called.group(1), ""), types, computations)
    return flops


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
    chunks = _INSTRUCTION.split(hlo_text)
    types = {}
    for chunk in chunks:
        head = _HEAD.match(chunk)
        if head:
            types[head.group(1)] = head.group(2)
    out = []
    for chunk in chunks:
        cycles = _CYCLES.search(chunk)
        head = _HEAD.match(chunk)
        if not head:
            continue
        name, dtype, layout, opcode = head.groups()
        kind = _kind(opcode, chunk)
        if not cycles and kind != "kernel":
            continue
        body = chunk
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
        first_line = chunk.strip().split("\n")[0]
        traffic = 0 if opcode in _NO_TRAFFIC or kind == "kernel" else (
            _array_bytes(dtype) + sum(_array_bytes(types.get(a, "")) for a in _operands(first_line)))
        out.append(OpCost(name=name, kind=kind, cycles=int(cycles.group(1)) if cycles else -1,
                          shape=f"{dtype}{layout or ''}", source=src,
                          flops=0.0 if kind == "kernel" else _matrix_flops(body, types, computations),
                          bytes=float(traffic)))
    return out


_JOINS = re.compile(r'custom-call\([^\n]*custom_call_target="ConcatBitcast"')


def unpriced_joins(hlo_text: str) -> int:
    """How many `ConcatBitcast` custom calls of a compiled module carry no estimate. The TPU compiler emits them
    to view the slices of an array it prefetched piece by piece (async `slice-start`/`slice-done` into adjacent
    buffers) as one buffer: a bitcast, no data moves. This libtpu prices each one at -1 s on v5e and v6e."""
    return sum(1 for chunk in _INSTRUCTION.split(hlo_text)
               if _JOINS.search(chunk) and not _CYCLES.search(chunk))


def summary(ops: list[OpCost], chip, step_seconds: float, *, kernel_seconds: float = 0.0, top: int = 12) -> dict:
    """Shares of the compiler's step estimate (`step_seconds`): XLA operations at their rooflines on `chip`, by
    kind; custom kernels at their declared costs (`kernel_seconds`, planning/report.py prices them); and
    "unattributed", what the two leave of the step (the re-reads the bytes here leave out, module note). The
    most expensive operations, and those the compiler could not price, are listed."""
    priced = [o for o in ops if o.kind != "kernel"]
    step = step_seconds or 1.0
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for o in priced:
        by_kind[o.kind][0] += o.seconds(chip)
        by_kind[o.kind][1] += 1
    if kernel_seconds > 0:
        by_kind["kernel"] = [kernel_seconds, sum(1 for o in ops if o.kind == "kernel")]
    rest = step - sum(t for t, _ in by_kind.values())
    unpriced: dict[str, int] = defaultdict(int)
    for o in ops:
        if o.cycles < 0 and o.kind != "kernel":
            unpriced[f"{o.kind} {o.source}"] += 1
    shares = {k: {"share": t / step, "ops": n} for k, (t, n) in sorted(by_kind.items(), key=lambda kv: -kv[1][0])}
    shares["unattributed"] = {"share": rest / step, "ops": 0}
    return {
        "xla_seconds": sum(o.seconds(chip) for o in priced),
        "by_kind": shares,
        "top": [{"name": o.name, "kind": o.kind, "share": o.seconds(chip) / step, "shape": o.shape,
                 "source": o.source, "flops": o.flops, "bytes": o.bytes}
                for o in sorted(priced, key=lambda o: -o.seconds(chip))[:top]],
        "unpriced": dict(sorted(unpriced.items(), key=lambda kv: -kv[1])),
    }

"""Compile the training step's representative piece (planning/piece.py: the first cross-attention level's down
and up blocks, forward and backward) for a TPU slice and compare attention layouts by the TPU compiler's
estimate: XLA attention, and `attention="pallas"` (every attention call through the kernels, cross-attention
included, where the step's `auto` keeps cross-attention on XLA) on (B*H, L, D) rows and on (B, L, H*D) lanes.
Stores bench/tpu_piece_results.json with the per-op breakdown (planning/ops.py). Estimates, not measurements.

    .venv-tpu/bin/python bench/tpu_piece.py [sd15|sdxl] [chip, e.g. v5p:2x2x1] [batch per chip]
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from ipadapter_jax.models import pallas_attention  # noqa: E402
from ipadapter_jax.planning import bases, ops, parse_topology, report  # noqa: E402
from ipadapter_jax.planning.piece import PieceSettings, piece_program  # noqa: E402

RESULTS = Path(__file__).with_name("tpu_piece_results.json")
# The layout is a keyword of sharded_flash_attention, chosen there from the mesh; a bench overrides the default.
_SHARDED = pallas_attention.sharded_flash_attention
VARIANTS = {"xla": ("xla", {}), "pallas rows": ("pallas", dict(lanes=False)), "pallas lanes": ("pallas", {})}


def main(base_name: str = "sd15", chip: str = "v5p:2x2x1", batch: int = 8) -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    topology = parse_topology(chip)
    base = bases.base_architecture(base_name)
    mesh = Mesh(np.asarray(topology.devices()).reshape(-1, 1), ("data", "fsdp"))
    latent = base.unet.sample_size
    for variant, (attention, kwargs) in VARIANTS.items():
        key = f"{chip} | {base_name} piece, {batch} per chip | {variant}"
        if key in results:
            continue
        pallas_attention.sharded_flash_attention = functools.partial(_SHARDED, **kwargs)
        step, args = piece_program(base.unet, PieceSettings(latent=latent, batch_per_chip=batch,
                                                            attention=attention), mesh, "tpu")
        start = time.perf_counter()
        with jax.set_mesh(mesh):
            compiled = step.lower(*args).compile()
        seconds = time.perf_counter() - start
        cost, text = compiled.cost_analysis(), compiled.as_text()
        if os.environ.get("TPU_PIECE_HLO_DIR"):  # the compiled module, for a closer look at its ops
            Path(os.environ["TPU_PIECE_HLO_DIR"], key.replace(" ", "_").replace("|", "").replace(",", "")
                 .replace("/", "-") + ".hlo").write_text(text)
        kernels = report.kernel_costs(text)
        model = cost["flops"] - sum(k.flops - k.useful_flops for k in kernels.values())
        kernel_s = sum(ops.roofline_seconds(k.flops, k.bytes, topology.chip)  # as the compiler prices them
                       for k in kernels.values())
        summary = ops.summary(ops.op_costs(text), topology.chip, cost["optimal_seconds"], kernel_seconds=kernel_s)
        results[key] = {"optimal_ms": 1e3 * cost["optimal_seconds"], "flops": cost["flops"], "model_flops": model,
                        "est_mfu": model / cost["optimal_seconds"] / topology.chip.peak_bf16_flops,
                        "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
                        "compile_s": round(seconds, 1), "by_kind": summary["by_kind"], "top": summary["top"]}
        print(key, {k: v for k, v in results[key].items() if k not in ("top",)}, flush=True)
        RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(*(sys.argv[1:3]), *(int(x) for x in sys.argv[3:4]))

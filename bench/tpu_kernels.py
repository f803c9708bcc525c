"""Compile the Pallas flash-attention kernels (forward, and forward + backward) for v5e, v5p and v6e at the
SD1.5 and SDXL attention shapes, against XLA's attention, and store the TPU compiler's estimates in
bench/tpu_kernel_results.json. Head layouts (padded to 128 lanes or kept narrow) and block sizes are compared
here; models/pallas_attention.py's defaults follow these numbers. Estimates, not measurements. On v5e and v6e
the compiler prices the `ConcatBitcast` joins of inputs it prefetches in slices at -1 s each; they move no data,
so `optimal_ms` adds them back (`joins`: how many).

    .venv-tpu/bin/python bench/tpu_kernels.py [--chips v5p:2x2x1 ...] [--only SUBSTRING]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from ipadapter_jax.models.attention import _plain  # noqa: E402
from ipadapter_jax.models.pallas_attention import flash_attention  # noqa: E402
from ipadapter_jax.planning import parse_topology  # noqa: E402
from ipadapter_jax.planning.ops import unpriced_joins  # noqa: E402

RESULTS = Path(__file__).with_name("tpu_kernel_results.json")
# (name, batch per chip, L, S, heads, head width): SD1.5 at 512^2 (8 images per chip), SDXL at 1024^2 (2 per chip)
SHAPES = [("sd15 64x64 self", 8, 4096, 4096, 8, 40), ("sd15 32x32 self", 8, 1024, 1024, 8, 80),
          ("sd15 64x64 cross", 8, 4096, 77, 8, 40), ("sdxl 64x64 self", 2, 4096, 4096, 10, 64),
          ("sdxl 32x32 self", 2, 1024, 1024, 20, 64)]
VARIANTS = [("xla", {}), ("pallas pad 512/512", dict(pad_head=True)), ("pallas narrow 512/512", dict(pad_head=False)),
            ("pallas narrow 1024/512", dict(pad_head=False, block_q=1024)),
            ("pallas narrow 512/1024", dict(pad_head=False, block_k=1024)),
            ("pallas lanes 512/512", dict(lanes=True)),
            ("pallas lanes padded 512/512", dict(lanes=True, pad_lanes=True)),
            ("pallas narrow stored probs 512/512", dict(pad_head=False, store_probs=True)),
            ("pallas tokens", dict(tokens=True))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chips", nargs="+", default=["v5p:2x2x1", "v5e:2x2", "v6e:2x2"])
    p.add_argument("--only", default="", help="compile only variants whose name contains this")
    args = p.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for chip in args.chips:
        one = NamedSharding(Mesh(np.asarray(parse_topology(chip).devices()[:1]), ("d",)), P())
        for shape_name, b, l, s, h, d in SHAPES:
            q = jax.ShapeDtypeStruct((b, l, h, d), jnp.bfloat16, sharding=one)
            kv = jax.ShapeDtypeStruct((b, s, h, d), jnp.bfloat16, sharding=one)
            for variant, kwargs in VARIANTS:
                if args.only not in variant:
                    continue
                fn = _plain if variant == "xla" else (lambda q, k, v, kw=kwargs: flash_attention(q, k, v, **kw))
                for what, f in (("fwd", fn), ("fwd+bwd", jax.grad(
                        lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32)), (0, 1, 2)))):
                    key = f"{chip} | {shape_name} | {variant} | {what}"
                    if key in results:
                        continue
                    start = time.perf_counter()
                    try:
                        c = jax.jit(f).lower(q, kv, kv).compile()
                    except Exception as e:  # noqa: BLE001 - a layout Mosaic rejects is a result too
                        results[key] = {"error": str(e).splitlines()[0][:300]}
                    else:
                        cost, mem = c.cost_analysis(), c.memory_analysis()
                        joins = unpriced_joins(c.as_text())  # -1 s each on v5e/v6e; they move no data
                        results[key] = {"optimal_ms": 1e3 * (cost["optimal_seconds"] + joins), "joins": joins,
                                        "flops": cost["flops"], "bytes": cost["bytes accessed"],
                                        "temp_bytes": mem.temp_size_in_bytes,
                                        "compile_s": round(time.perf_counter() - start, 1)}
                    print(key, results[key], flush=True)
                    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

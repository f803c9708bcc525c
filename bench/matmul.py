"""The host's float32 matrix-product rate in each library: one n x n x n product under jit (XLA:CPU with the CLI's
set-up) against torch's `@` (MKL), same inputs, each side in its own process, alternating (see _common.py). The
UNet's large products and convolutions run near this rate, so it bounds how far ours can lead or trail torch on a
given CPU (the README's performance section quotes it beside the generation numbers).

    python bench/matmul.py [--size 4096] [--rounds 2] [--repeats 5] [--dtype float32]

Last line: RESULT name=matmul ours_gflops=<median> reference_gflops=<median> speedup=<ours/reference>
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
from _common import alternate, configure_xla_for_cpu, emit, host_cpu, timed


def _operands(args):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((args.size, args.size), dtype=np.float32),
            rng.standard_normal((args.size, args.size), dtype=np.float32))


def side_ours(args) -> None:
    configure_xla_for_cpu()
    import jax
    import jax.numpy as jnp

    a, b = (jnp.asarray(x, args.dtype) for x in _operands(args))
    product = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    product(a, b).block_until_ready()
    times = [timed(lambda: product(a, b).block_until_ready()) for _ in range(args.repeats)]
    emit({"times": times, "jax": jax.__version__})


def side_reference(args) -> None:
    import torch

    a, b = (torch.from_numpy(x).to(getattr(torch, args.dtype)) for x in _operands(args))
    a @ b
    times = [timed(lambda: a @ b) for _ in range(args.repeats)]
    emit({"times": times, "torch": torch.__version__, "threads": torch.get_num_threads()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=2, help="alternations of the two sides")
    p.add_argument("--repeats", type=int, default=5, help="timed products per side per round")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--side", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side == "ours":
        return side_ours(args)
    if args.side == "reference":
        return side_reference(args)
    reports = alternate(Path(__file__), sys.argv[1:], args.rounds)
    flop = 2 * args.size ** 3
    rate = {side: flop / statistics.median(t for r in rs for t in r["times"]) / 1e9 for side, rs in reports.items()}
    ref = reports["reference"][0]
    print(f"{host_cpu()}; {args.size}^3 {args.dtype} product, medians of {args.rounds * args.repeats}")
    print(f"ours (jax {reports['ours'][0]['jax']}): {rate['ours']:.0f} GFLOP/s; torch {ref['torch']} "
          f"({ref['threads']} threads): {rate['reference']:.0f} GFLOP/s")
    print(f"RESULT name=matmul ours_gflops={rate['ours']:.1f} reference_gflops={rate['reference']:.1f} "
          f"speedup={rate['ours'] / rate['reference']:.2f}")


if __name__ == "__main__":
    main()

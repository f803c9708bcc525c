"""Compile full-size steps for TPU slices on this host (libtpu) and keep each estimate in
bench/tpu_plan_results.json, keyed by the command line, so that no configuration is compiled twice.

    .venv-tpu/bin/python bench/tpu_plan.py train --config train/sd15_plus.yaml --topology v5p:2x2x1 \\
        global_batch_size=32 model.attention=xla
    .venv-tpu/bin/python bench/tpu_plan.py generate --base sdxl --topology v5e:2x2 --batch-per-chip 2 --steps 30

Every number is the TPU compiler's estimate (`cost_analysis`, `memory_analysis`), not a measurement.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("tpu_plan_results.json")


def main(argv: list[str]) -> None:
    """`argv`: the job (train or generate), then `ipadapter-jax plan`'s flags and overrides, and --force to compile
    again a configuration whose result is stored."""
    force = "--force" in argv
    argv = argv_without_force(argv)
    key = " ".join(argv)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if key in results and not force:
        print(f"stored: {key}\n{json.dumps(results[key], indent=1)}")
        return
    from ipadapter_jax.cli import build_parser
    from ipadapter_jax.planning import table
    from ipadapter_jax.planning.plan import estimate_from_args

    if not argv or argv[0] not in ("train", "generate"):
        raise SystemExit("usage: bench/tpu_plan.py {train,generate} [ipadapter-jax plan flags] [--force]")
    estimate = estimate_from_args(build_parser().parse_args(["plan", "--job", *argv]))
    print(table(estimate), flush=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}  # others may have written meanwhile
    results[key] = {**estimate.to_json(), "recorded": time.strftime("%Y-%m-%d %H:%M")}
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


def argv_without_force(argv: list[str]) -> list[str]:
    return [a for a in argv if a != "--force"]


if __name__ == "__main__":
    main(sys.argv[1:])

"""Compile full-size steps for TPU slices on this host (libtpu) and keep each estimate in
bench/tpu_plan_results.json, keyed by the command line, so that no configuration is compiled twice.

    .venv-tpu/bin/python bench/tpu_plan.py train --config train/sd15_plus.yaml --topology v5p:2x2x1 \\
        global_batch_size=32 model.attention=xla
    .venv-tpu/bin/python bench/tpu_plan.py generate --base sdxl --topology v5e:2x2 --batch-per-chip 2 --steps 30

Every number is the TPU compiler's estimate (`cost_analysis`, `memory_analysis`), not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("tpu_plan_results.json")


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("job", choices=["train", "generate"])
    p.add_argument("--topology", required=True)
    p.add_argument("--config")
    p.add_argument("--base", default="sd15")
    p.add_argument("--adapter", default="plus")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch-per-chip", type=int, default=1)
    p.add_argument("--attention", default="auto")
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--force", action="store_true", help="compile again even if a result is stored")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    key = " ".join(argv_without_force(argv))
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if key in results and not args.force:
        print(f"stored: {key}\n{json.dumps(results[key], indent=1)}")
        return
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiles may run at once; no TPU here
    from ipadapter_jax.planning import GenerateSettings, base_architecture, plan_generate, plan_train, table

    if args.job == "train":
        from ipadapter_jax.training.config import load_train_config

        estimate = plan_train(load_train_config(args.config, args.overrides), args.topology)
    else:
        base = base_architecture(args.base)
        size = base.unet.sample_size * base.vae_scale_factor
        estimate = plan_generate(args.base, GenerateSettings(
            height=args.height or size, width=args.width or size, steps=args.steps, guidance=args.guidance,
            batch_per_chip=args.batch_per_chip, adapter=None if args.adapter == "none" else args.adapter,
            attention=args.attention, fsdp=args.fsdp), args.topology)
    print(table(estimate), flush=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}  # others may have written meanwhile
    results[key] = {**estimate.to_json(), "recorded": time.strftime("%Y-%m-%d %H:%M")}
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


def argv_without_force(argv: list[str]) -> list[str]:
    return [a for a in argv if a != "--force"]


if __name__ == "__main__":
    main(sys.argv[1:])

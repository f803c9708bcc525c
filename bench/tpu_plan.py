"""Compile full-size steps for TPU slices on this host (libtpu) and keep each estimate in
bench/tpu_plan_results.json, keyed by the command line, so that no configuration is compiled twice.

    .venv-tpu/bin/python bench/tpu_plan.py train --config train/sd15_plus.yaml --topology v5p:2x2x1 \\
        global_batch_size=32 model.attention=xla
    .venv-tpu/bin/python bench/tpu_plan.py generate --base sdxl --topology v5e:2x2 --batch-per-chip 2 --steps 30
    .venv-tpu/bin/python bench/tpu_plan.py rows      # compile the README's rows not stored yet (resumable)
    .venv-tpu/bin/python bench/tpu_plan.py table [--write-readme]   # the README table and the RESULT line

Every number is the TPU compiler's estimate (`cost_analysis`, `memory_analysis`), not a measurement.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("tpu_plan_results.json")


README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- tpu_plan table: begin -->", "<!-- tpu_plan table: end -->"
PAPER_IMAGES = 64_000_000  # the paper's SD1.5 run: 1M steps at global batch 64 (8 GPUs x 8)
# The paper's run on 64 chips (v5p-128 in Cloud TPU's names, which count TensorCores) at the batch the v5p rows
# estimate fastest per image.
PAPER_64_CHIPS = "train --config train/sd15_plus.yaml --topology v5p-128 global_batch_size=2048"

# (what, family, key): family names the RESULT field whose best MFU the row counts for (the goals: SD1.5
# training on v5p, SDXL generation on v5e), None for none; key is the stored command line.
ROWS = [
    ("SD1.5 Plus training, 512², the recipe (64 images, 2 per chip)", "sd15_train",
     "train --config train/sd15_plus.yaml --topology v5p-64"),
    ("SD1.5 Plus training, 512², 8 per chip (global batch 256)", "sd15_train",
     "train --config train/sd15_plus.yaml --topology v5p-64 global_batch_size=256"),
    ("SD1.5 Plus training, 512², 8 per chip, 4 chips", "sd15_train",
     "train --config train/sd15_plus.yaml --topology v5p:2x2x1 global_batch_size=32 model.attention=auto"),
    ("SD1.5 Plus training, 512², 16 per chip, 4 chips", "sd15_train",
     "train --config train/sd15_plus.yaml --topology v5p:2x2x1 global_batch_size=64"),
    ("SD1.5 Plus training, 512², 32 per chip, 4 chips", "sd15_train",
     "train --config train/sd15_plus.yaml --topology v5p:2x2x1 global_batch_size=128"),
    ("SD1.5 Plus training, 512², 48 per chip, 4 chips", "sd15_train",
     "train --config train/sd15_plus.yaml --topology v5p:2x2x1 global_batch_size=192"),
    ("SD1.5 Plus training, 512², 32 per chip, 64 chips (the issue's 64-chip reading of v5p-64)", "sd15_train",
     "train --config train/sd15_plus.yaml --topology v5p-128 global_batch_size=2048"),
    ("SD1.5 Plus training, 512², mesh: auto (64 images rise to 256)", None,
     "train --config train/sd15_plus.yaml --topology v5e-256 mesh=auto"),
    ("SD1.5 Plus training, 512², 8 per chip", None,
     "train --config train/sd15_plus.yaml --topology v6e-8 global_batch_size=64"),
    ("SDXL base training, 1024², the recipe (mesh: auto, remat: auto)", "sdxl_train",
     "train --config train/sdxl_base.yaml --topology v5p-64"),
    ("SDXL base training, 1024², the recipe (mesh: auto, remat: auto; 32 images rise to 256)", "sdxl_train",
     "train --config train/sdxl_base.yaml --topology v5e-256"),
    ("SD1.5 + Plus generation, 512², 30 steps, CFG 7.5, 8 per chip", "sd15_generate",
     "generate --base sd15 --topology v5e-8 --steps 30 --batch-per-chip 8"),
    ("SDXL + Plus generation, 1024², 30 steps, CFG 7.5, 2 per chip", "sdxl_generate",
     "generate --base sdxl --topology v5e:2x2 --height 1024 --width 1024 --steps 30 --batch-per-chip 2 "
     "--attention auto"),
    ("SDXL + Plus generation, 1024², 30 steps, CFG 7.5, 2 per chip", None,
     "generate --base sdxl --topology v6e-8 --steps 30 --batch-per-chip 2"),
    ("SDXL + Plus generation, 1024², 30 steps, CFG 7.5, 2 per chip", None,
     "generate --base sdxl --topology v5p:2x2x1 --height 1024 --width 1024 --steps 30 --batch-per-chip 2 "
     "--attention auto"),
]


def _bound(r: dict) -> bool:
    return any("could not price" in n for n in r["notes"])


def _cell(r: dict) -> list[str]:
    mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
    hours = r.get("est_total_hours")
    return [r["accelerator_type"] + f" ({r['topology']})", f"{mesh}, {r['batch_per_chip']:g}/chip",
            r.get("remat") or "-", f"{r['hbm_used_bytes_per_chip'] / 2**30:.1f} of "
            f"{r['hbm_capacity_bytes_per_chip'] / 2**30:.0f}", f"{r['est_step_s'] * 1e3:.1f} ms",
            f"{100 * r['est_mfu']:.1f}%" + (" (bound)" if _bound(r) else ""),
            f"{r['images_per_s']:,.1f}", f"{hours:,.1f}" if hours is not None else "-",
            f"{r['compile_seconds'] / 60:.0f}", r.get("recorded", "")[:10]]


def readme_table(results: dict) -> tuple[str, str]:
    """(markdown table of ROWS, RESULT line) from the stored results."""
    head = ["row", "slice (compiled)", "mesh, per chip", "remat", "HBM GiB/chip", "step (est.)", "MFU (est.)",
            "images/s, slice (est.)", "run hours (est.)", "compile min", "recorded"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    best: dict[str, float] = {}
    bounds: dict[str, float] = {}  # from plans with unpriced operations: upper bounds, used only without others
    for what, family, key in ROWS:
        r = results.get(key)
        if r is None:
            lines.append(f"| {what} | not compiled yet: `bench/tpu_plan.py {key}` |" + " |" * (len(head) - 2))
            continue
        lines.append("| " + " | ".join([what, *_cell(r)]) + " |")
        if family:
            into = bounds if _bound(r) else best
            into[family] = max(into.get(family, 0.0), r["est_mfu"])
        if key == ROWS[0][2]:  # the recipe on v5p-64, at the batch plan keeps: the paper's images at its rate
            best["paper_hours"] = PAPER_IMAGES / r["images_per_s"] / 3600
        if key == PAPER_64_CHIPS:
            best["paper_hours_64"] = PAPER_IMAGES / r["images_per_s"] / 3600

    best = {**bounds, **best}

    def field(name: str, key: str) -> str:
        return f"{name}={best[key]:.3f}" if key in best else f"{name}=na"

    result = " ".join(["RESULT name=tpu_plan", field("sd15_train_mfu_est", "sd15_train"),
                       field("sdxl_train_mfu_est", "sdxl_train"), field("sd15_generate_mfu_est", "sd15_generate"),
                       field("sdxl_generate_v5e_mfu_est", "sdxl_generate"),
                       field("paper_run_hours_v5p64_est", "paper_hours"),
                       field("paper_run_hours_64chips_est", "paper_hours_64")])
    return "\n".join(lines), result


def write_readme(text: str) -> None:
    readme = README.read_text()
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    README.write_text(readme[:start] + "\n" + text + "\n" + readme[end:])


def main(argv: list[str]) -> None:
    """`argv`: the job (train or generate), then `ipadapter-jax plan`'s flags and overrides, and --force to compile
    again a configuration whose result is stored; or `rows` (compile the missing README rows), or `table`."""
    if argv[:1] == ["rows"]:
        for _, _, key in ROWS:
            main(key.split())
        argv = ["table"]
    if argv[:1] == ["table"]:
        text, result = readme_table(json.loads(RESULTS.read_text()) if RESULTS.exists() else {})
        if "--write-readme" in argv:
            write_readme(f"{text}\n\n```\n{result}\n```")
        print(text)
        print(result)
        return
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

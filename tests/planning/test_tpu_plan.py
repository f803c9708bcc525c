"""Compiling for a TPU slice on this CPU host, with libtpu in its own virtualenv (a subprocess): a tiny UNet's
training step and batch-generation step for v5e:2x2, on a data mesh and an fsdp mesh, and `mesh: auto`.

The TPU virtualenv is `$IPADAPTER_JAX_TPU_PYTHON` (set by .ci/run) or `.venv-tpu/bin/python` at the repository
root. Under CI it must exist; elsewhere the test is skipped with the command that makes it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAKE_VENV = 'python -m venv .venv-tpu && .venv-tpu/bin/pip install -e ".[tpu,data]"'


def _tpu_python() -> str:
    given = os.environ.get("IPADAPTER_JAX_TPU_PYTHON")
    path = Path(given) if given else ROOT / ".venv-tpu" / "bin" / "python"
    if path.exists():
        return str(path)
    message = f"no TPU virtualenv (libtpu) at {path}; make one with: {MAKE_VENV}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def results() -> list[dict]:
    # the TPU compiles as users' plans do (the suite's JAX_DISABLE_MOST_OPTIMIZATIONS is for its CPU programs)
    unset = ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_DISABLE_MOST_OPTIMIZATIONS")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["PYTHONPATH"] = str(ROOT)
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # compile beside other libtpu processes (no TPU is opened)
    proc = subprocess.run([_tpu_python(), str(Path(__file__).with_name("tpu_worker.py")), "v5e:2x2"], env=env,
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_tpu_target_compiles_without_the_cpu_paths(results):
    hlo = next(r for r in results if r["job"] == "hlo")
    assert hlo["tpu_custom_call"] > 0  # the Pallas kernels, compiled by Mosaic
    assert hlo["cpu_chunked_attention"] == 0 and hlo["cpu_gemm_conv"] == 0
    # the compile-only devices report the kinds real chips do, which pick the kernels' layout (models/target.py)
    assert hlo["chips"] == {"v5e:2x2": "v5e", "v5p:2x2x1": "v5p", "v6e:2x2": "v6e"}


@pytest.mark.parametrize(("job", "kernels"), [("lanes", ["ipadapter_flash_bwd", "ipadapter_flash_fwd"]),
                                             ("probs", ["ipadapter_probs_bwd", "ipadapter_probs_fwd"])])
def test_attention_kernels_compile_for_v5p(results, job, kernels):
    """Mosaic accepts the lanes kernels and the stored-probabilities kernels (a whole 4096-key row in one forward
    block, within the compiler's default scoped VMEM), and the compiler prices them."""
    r = next(r for r in results if r["job"] == job)
    assert r["kernels"] == kernels
    assert 0 < r["optimal_seconds"] < 1  # priced (declared costs), not the -1 s of an unpriced operation


def test_the_feed_forward_kernel_compiles_for_v5p_and_beats_xlas_backward(results):
    """Mosaic accepts the feed-forward branch's input-gradient kernel at SD1.5's 64x64 sizes, the compiler prices
    it, and the branch's input gradient estimates faster with it than with XLA's TPU backward, which writes
    d(h, gate) to HBM and reads it back (bench/tpu_notes.md)."""
    r = next(r for r in results if r["job"] == "feed forward")
    assert r["kernel"]["kernel"] and not r["xla"]["kernel"]
    assert 0 < r["kernel"]["optimal_seconds"] < r["xla"]["optimal_seconds"]


def test_tokens_in_the_lanes_leave_no_layout_copies_around_the_kernels(results):
    """The tokens layout is the one XLA keeps the projections in: a differentiated attention block (SD1.5's
    40-wide heads) has no layout copies left, where the rows layout spends a large share of it on transposes."""
    rows, tokens = (next(r for r in results if r["job"] == job) for job in ("block rows", "block tokens"))
    assert rows["kernels"] == tokens["kernels"] == ["ipadapter_probs_bwd", "ipadapter_probs_fwd"]
    assert rows["copy_cycles"] > 0.2 * rows["cycles"]
    assert tokens["copy_cycles"] == 0 and tokens["cycles"] < rows["cycles"]


def test_the_step_estimate_is_the_sum_of_per_operation_rooflines(results):
    """The compiler's `optimal_seconds` is what planning/ops.py adds up: each XLA operation at the longer of its
    matrix work and its traffic, each kernel at its declared costs, at the chip's rates in `Chip`; checked on
    every chip whose plans we publish (a libtpu that prices differently fails here: kernels priced at the v5p's
    peak instead of its 85.8% would leave 85% of this block). The bytes read each operand once, a lower bound
    (the compiler counts re-reads of tiled operands): 98% of the estimate on v5p, 95% on v5e and v6e."""
    checks = [r for r in results if r["job"] == "roofline"]
    assert {r["chip"] for r in checks} == {"v5p", "v5e", "v6e"}
    for r in checks:
        assert 0 < r["kernel_seconds"] < r["modeled_seconds"]
        assert 0.92 * r["optimal_seconds"] < r["modeled_seconds"] <= 1.001 * r["optimal_seconds"], r["chip"]


def test_the_operations_v5e_leaves_unpriced_are_bitcasts_that_we_count(results):
    """Every -1 s in this program's estimate is a ConcatBitcast (free: no data moves), and no more: once they
    count as 0 s the step is priced at no faster than the v5e's peak for its FLOPs (197 TFLOP/s)."""
    r = next(r for r in results if r["job"] == "joins")
    assert r["joins"] >= 1 and r["optimal_seconds"] < 0
    priced = r["optimal_seconds"] + r["joins"]
    assert r["flops"] / 197e12 <= priced < 1


@pytest.mark.parametrize(("job", "fsdp"), [("train", 1), ("train", 2), ("generate", 2)])
def test_tiny_steps_compile_and_report(results, job, fsdp):
    r = next(r for r in results if r["job"] == job and r["fsdp"] == fsdp)
    assert r["topology"] == "v5e:2x2" and r["mesh"] == {"data": 4 // fsdp, "fsdp": fsdp}
    assert r["fits"] and 0 < r["hbm_used_bytes_per_chip"] < r["hbm_capacity_bytes_per_chip"]
    assert r["hbm_argument_bytes"] > 0 and r["hbm_temp_bytes"] > 0
    # The bound that held at 256 x 256, scaled with the pixels (the train steps compile at 128 x 128: ~3e9)
    assert r["flops_per_chip_step"] > 1e9 * (r["resolution"] / 256) ** 2
    assert 0 < r["est_step_s"] < 1 and 0 < r["est_mfu"] < 1
    assert r["images_per_s"] > 0
    kernels = r["kernels"]
    names = {"ipadapter_flash_fwd"} | ({"ipadapter_flash_bwd"} if job == "train" else set())
    assert names <= set(kernels)  # our Pallas kernels (by auto for 1024 tokens in generation, by name in training)
    for k in kernels.values():  # declared costs: issued work (128-lane heads) above the useful math
        assert k["flops"] > k["useful_flops"] > 0 and k["bytes"] > 0
        assert k["layout"] == "lanes"  # read back from the compiled program: heads in the lanes on v5e
    assert 0 < r["kernel_time_share"] < 1
    shares = r["time_by_kind"]  # per-operation rooflines grouped, kernels, unattributed (planning/ops.py)
    assert sum(shares.values()) == pytest.approx(1.0) and shares["kernel"] > 0
    assert shares.get("convolution", 0) + shares.get("matmul", 0) > 0
    padding = sum(k["flops"] - k["useful_flops"] for k in kernels.values())  # model FLOPs: the useful math, and
    assert r["model_flops_per_chip_step"] == pytest.approx(  # not what remat recomputes (the next test)
        (r["flops_per_chip_step"] - padding) * (1 - r["recompute_share"]), rel=1e-9)


def test_auto_plan_compiles_the_search_pick(results):
    """Memory is plentiful for the tiny UNet: `mesh: auto` picks the data mesh, and the global batch of 2 rose to
    the 4 chips with half the steps (the recipe names its remat policy; `remat: auto` is tested on CPU, in
    tests/planning/test_search.py and tests/training/test_sharded.py)."""
    r = next(r for r in results if r["job"] == "train" and r["fsdp"] == 1)
    assert r["fits"] and r["mesh"] == {"data": 4, "fsdp": 1} and r["remat"] == "dots_no_batch"
    assert r["batch_per_chip"] == 1 and r["items_per_step"] == 4 and r["total_steps"] == 500
    assert any("raised to 4, and total_steps 1000 -> 500" in n for n in r["notes"])
    assert any(n.startswith("mesh: auto chose fsdp=1, remat=dots_no_batch, 1 per chip") for n in r["notes"])


def test_mfu_leaves_out_what_remat_recomputes(results):
    """The data-mesh step compiles under remat dots_no_batch: the compiler's FLOPs hold the recomputed forward
    work, the model FLOPs (and MFU) do not; the fsdp step has no remat and nothing is taken out."""
    r = next(r for r in results if r["job"] == "train" and r["fsdp"] == 1)
    # the traced count on this UNet at 128 x 128: 14.7% (15.5% at 256 x 256, where the compiled steps with and
    # without remat differed by 15.4%)
    assert r["remat"] == "dots_no_batch" and 0.1 < r["recompute_share"] < 0.25
    assert any("recomputes" in n for n in r["notes"])
    plain = next(r for r in results if r["job"] == "train" and r["fsdp"] == 2)
    assert plain["remat"] == "none" and plain["recompute_share"] == 0


def test_json_has_the_documented_keys(results):
    keys = {"fits", "topology", "mesh", "batch_per_chip", "hbm_used_bytes_per_chip", "hbm_capacity_bytes_per_chip",
            "flops_per_chip_step", "est_step_s", "est_mfu", "images_per_s", "est_total_hours"}
    plans = [r for r in results if r["job"] in ("train", "generate")]  # not the single-program checks
    assert len(plans) == 3
    for r in plans:
        assert keys <= set(r)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

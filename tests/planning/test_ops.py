"""planning/ops.py reads every scheduled operation of a compiled module's text, with its FLOPs and bytes, and
prices it as the TPU compiler's `optimal_seconds` does. The module below is cut down from a real libtpu compile
(a 3x3 convolution, a dot that TPU rewrites as a 1x1 convolution, an elementwise loop, a layout copy, a Pallas
kernel (no cycles: it declares its costs), and one operation the compiler left unpriced); the whole-program
check against the compiler is tests/planning/tpu_worker.py's."""

# ruff: noqa: E501  (HLO lines are as long as the compiler writes them)
from __future__ import annotations

import pytest

from ipadapter_jax.planning import ops
from ipadapter_jax.planning.topology import CHIPS

_CFG = '{{"window_config":{{"estimated_cycles":"{}","iteration_bounds":["1"]}}}}'
HLO = f"""HloModule jit_f, entry_computation_layout={{(bf16[8,64,64,320]{{3,2,1,0}})->bf16[]}}

%fused_computation.4 (param_0: bf16[8,64,64,320], param_1: bf16[3,3,320,320]) -> bf16[8,64,64,320] {{
  %param_0 = bf16[8,64,64,320]{{3,0,2,1:T(8,128)(2,1)}} parameter(0)
  ROOT %conv_general_dilated.1 = bf16[8,64,64,320]{{3,0,2,1:T(8,128)(2,1)}} convolution(%param_0, %param_1), window={{size=3x3 pad=1_1x1_1}}, dim_labels=b01f_01io->b01f, metadata={{op_name="jit(f)/jvp()/conv_general_dilated"}}
}}

%fused_computation.2 (param_0: bf16[8,64,64,320], param_1: bf16[320,320]) -> bf16[8,64,64,320] {{
  ROOT %convolution.3 = bf16[8,64,64,320]{{3,2,1,0:T(8,128)(2,1)}} convolution(%param_0, %param_1), window={{size=1x1}}, dim_labels=01bf_oi01->01bf, metadata={{op_name="jit(f)/transpose(jvp())/dot_general"}}
}}

%fused_computation.6 (param_0: bf16[8,64,64,320]) -> bf16[8,64,64,320] {{
  %param_0 = bf16[8,64,64,320]{{3,2,1,0:T(8,128)(2,1)}} parameter(0)
  ROOT %multiply.1 = bf16[8,64,64,320]{{3,2,1,0:T(8,128)(2,1)}} multiply(%param_0, %param_0)
}}

ENTRY %main.1 (x.1: bf16[8,64,64,320]) -> bf16[] {{
  %x.1 = bf16[8,64,64,320]{{3,2,1,0}} parameter(0)
  %fusion.4 = bf16[8,64,64,320]{{3,0,2,1:T(8,128)(2,1)}} fusion(%x.1, %k), kind=kOutput, calls=%fused_computation.4, metadata={{op_name="jit(f)/jvp()/conv_general_dilated"}}, backend_config={_CFG.format(600)}
  %fusion.1 = bf16[8,64,64,320]{{3,2,1,0:T(8,128)(2,1)}} fusion(%fusion.4, %w), kind=kOutput, calls=%fused_computation.2, metadata={{op_name="jit(f)/dot_general"}}, backend_config={_CFG.format(200)}
  %fusion.6 = bf16[8,64,64,320]{{3,2,1,0:T(8,128)(2,1)}} fusion(%fusion.1), kind=kLoop, calls=%fused_computation.6, metadata={{op_name="jit(f)/jvp(jit(silu))/mul"}}, backend_config={_CFG.format(50)}
  %copy.6 = bf16[8,64,64,320]{{3,0,2,1:T(8,128)(2,1)}} copy(%fusion.6), backend_config={_CFG.format(50)}
  %ipadapter_flash_fwd.1 = (bf16[16,4096,40]{{2,1,0:T(8,128)(2,1)}}, f32[16,4096,128]{{2,1,0:T(8,128)}}) custom-call(%copy.6), custom_call_target="tpu_custom_call", backend_config={{"custom_call_config":{{"cost_estimate":{{"flops":"1"}}}}}}
  %all-reduce.2 = f32[320]{{0}} all-reduce(%p), replica_groups={{}}, backend_config={{"estimated_cycles":"-1"}}
  ROOT %reduce.1 = bf16[] reduce(%copy.6, %c), dimensions={{0,1,2,3}}, to_apply=%add
}}
"""


def test_operations_are_classified_with_their_cycles():
    got = {o.name: (o.kind, o.cycles) for o in ops.op_costs(HLO)}
    assert got == {"fusion.4": ("convolution", 600), "fusion.1": ("matmul", 200), "fusion.6": ("loop", 50),
                   "copy.6": ("copy", 50), "ipadapter_flash_fwd.1": ("kernel", -1),  # kernels: declared costs only
                   "all-reduce.2": ("collective", -1)}  # the reduce carries no estimate: left out


X = 8 * 64 * 64 * 320  # elements of every activation above


def test_flops_count_the_window_where_it_meets_data_and_bytes_every_operand():
    got = {o.name: o for o in ops.op_costs(HLO)}
    # 3x3 with padding 1 over 64 positions: 64 * 3 - 2 window positions read data per spatial dimension
    assert got["fusion.4"].flops == 2 * 8 * 320 * (64 * 3 - 2) ** 2 * 320
    assert got["fusion.1"].flops == 2 * X * 320  # the dot as a 1x1 convolution
    assert got["fusion.6"].flops == got["copy.6"].flops == 0
    assert got["fusion.4"].bytes == 2 * X * 2  # x.1 and the result (the kernel %k is not defined in this cut)
    assert got["copy.6"].bytes == 2 * X * 2
    assert got["ipadapter_flash_fwd.1"].bytes == 0  # kernels: their declared costs (planning/report.py)


def test_an_operation_takes_the_longer_of_its_matrix_work_and_its_traffic():
    v5p = CHIPS["v5p"]
    conv, copy = (o for o in ops.op_costs(HLO) if o.name in ("fusion.4", "copy.6"))
    assert conv.seconds(v5p) == pytest.approx(conv.flops / (459e12 * 0.858))  # bound by the matrix unit
    assert copy.seconds(v5p) == pytest.approx(copy.bytes / (2765e9 * 0.85))  # bound by HBM


def test_summary_shares_of_the_step_kernels_and_what_is_left():
    v5p = CHIPS["v5p"]
    costs = ops.op_costs(HLO)
    xla = sum(o.seconds(v5p) for o in costs if o.kind != "kernel")
    s = ops.summary(costs, v5p, step_seconds=2 * xla, kernel_seconds=0.25 * xla, top=2)
    assert s["xla_seconds"] == pytest.approx(xla)
    assert s["by_kind"]["kernel"] == {"share": pytest.approx(0.125), "ops": 1}
    assert s["by_kind"]["unattributed"]["share"] == pytest.approx(0.375)  # 1 - 1/2 - 1/8
    assert list(s["by_kind"])[:2] == ["convolution", "kernel"]  # most expensive first
    assert sum(k["share"] for k in s["by_kind"].values()) == pytest.approx(1.0)
    assert [t["name"] for t in s["top"]] == ["fusion.4", "fusion.1"]
    assert s["top"][0]["shape"] == "bf16[8,64,64,320]{3,0,2,1:T(8,128)(2,1)}"
    assert s["unpriced"] == {"collective ": 1}

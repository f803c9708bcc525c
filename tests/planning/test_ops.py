"""planning/ops.py reads the TPU compiler's per-operation cycle estimates from a compiled module's text. The
module below is cut down from a real libtpu compile (a 3x3 convolution, a dot that TPU rewrites as a 1x1
convolution, an elementwise loop, a layout copy, a Pallas kernel (no cycles: it declares its costs), and one operation the
compiler left unpriced)."""

# ruff: noqa: E501  (HLO lines are as long as the compiler writes them)
from __future__ import annotations

import pytest

from ipadapter_jax.planning import ops

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


def test_summary_shares_and_unpriced():
    s = ops.summary(ops.op_costs(HLO), top=2)
    assert s["total_cycles"] == 900
    assert s["by_kind"]["convolution"] == {"share": pytest.approx(600 / 900), "ops": 1}
    assert "kernel" not in s["by_kind"]
    assert list(s["by_kind"])[:2] == ["convolution", "matmul"]  # most expensive first
    assert sum(k["share"] for k in s["by_kind"].values()) == pytest.approx(1.0)
    assert [t["name"] for t in s["top"]] == ["fusion.4", "fusion.1"]
    assert s["top"][0]["shape"] == "bf16[8,64,64,320]{3,0,2,1:T(8,128)(2,1)}"
    assert s["unpriced"] == {"collective ": 1}


def test_kernels_take_their_share_and_xla_the_rest():
    s = ops.summary(ops.op_costs(HLO), kernel_share=0.25)
    assert s["by_kind"]["kernel"] == {"share": pytest.approx(0.25), "ops": 1}
    assert s["by_kind"]["convolution"]["share"] == pytest.approx(0.75 * 600 / 900)
    assert sum(k["share"] for k in s["by_kind"].values()) == pytest.approx(1.0)

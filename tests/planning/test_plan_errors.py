"""A program the TPU compiler refuses for the chip's HBM is a plan that does not fit: one sentence with the way
out, not a traceback (the compiler reports it as RESOURCE_EXHAUSTED before any estimate exists)."""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest

from ipadapter_jax.errors import UserError
from ipadapter_jax.planning import parse_topology, plan


class _Refused:
    def __init__(self, message):
        self.message = message

    def lower(self):
        return self

    def compile(self):
        raise RuntimeError(self.message)


def _program(message):
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("data",))
    return types.SimpleNamespace(name="train step", items_per_step=4, mesh=mesh, lower=_Refused(message).lower)


def test_out_of_hbm_is_a_plan_that_does_not_fit():
    oom = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (16.55G) "
           "exceeds available HBM (15.75G).\nmore lines")
    with pytest.raises(UserError) as e:
        plan._compile(_program(oom), parse_topology("v5e-256"), plan.TRAIN_MEMORY_ADVICE)
    text = str(e.value)
    assert text.startswith("train step does not fit on v5e-256 (v5e:16x16), 1 per chip: Ran out of memory on HBM")
    assert "(16.55G) exceeds available HBM (15.75G)" in text and "more lines" not in text
    assert "model.remat=full" in text and "mesh.fsdp=N" in text


def test_other_compiler_errors_are_not_hidden():
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        plan._compile(_program("INVALID_ARGUMENT: something else"), parse_topology("v5e-8"), plan.GENERATE_ADVICE)


@pytest.mark.parametrize(("message", "reason"), [
    ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 21.95G of "
     "15.48G hbm. Exceeded hbm capacity by 6.47G.\n\nTotal hbm usage >= 22.47G:",
     "XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 21.95G of 15.48G hbm. Exceeded "
     "hbm capacity by 6.47G."),
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (16.55G) exceeds "
     "available HBM (15.75G).\nmore lines",
     "Ran out of memory on HBM, the total memory required for HLO temporaries (16.55G) exceeds available HBM "
     "(15.75G)."),
    # a Pallas kernel over its VMEM is the kernel's problem, not the plan's: no other split fixes it
    ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space vmem. Used 32.42M of "
     "16.00M vmem.", None),
    ("INVALID_ARGUMENT: hbm is mentioned, but this is no refusal", None),
    ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space vmem.\n"
     "Total hbm usage >= 1.2G:", None),  # HBM named only in the listing below
])
def test_both_wordings_of_the_out_of_hbm_refusal_are_recognised(message, reason):
    from ipadapter_jax.errors import hbm_refusal

    assert hbm_refusal(RuntimeError(message)) == reason

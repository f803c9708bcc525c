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
        plan._compile(_program(oom), parse_topology("v5e-256"), plan.TRAIN_ADVICE)
    text = str(e.value)
    assert text.startswith("train step does not fit on v5e-256 (v5e:16x16), 1 per chip: Ran out of memory on HBM")
    assert "(16.55G) exceeds available HBM (15.75G)" in text and "more lines" not in text
    assert "model.remat=full" in text and "mesh.fsdp=N" in text


def test_other_compiler_errors_are_not_hidden():
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        plan._compile(_program("INVALID_ARGUMENT: something else"), parse_topology("v5e-8"), plan.GENERATE_ADVICE)

"""The feed-forward's GEGLU: the TPU backward that recomputes the gate's CDF gives torch's gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from ipadapter_jax.models.transformer import GEGLU, _geglu, geglu_recomputing


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def test_recomputing_the_gate_gives_torchs_gelu_gradients():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 37, 48)) * 3).astype(np.float32)  # gates from about -10 to 10: both CDF tails
    d_out = rng.standard_normal((2, 37, 24)).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    h, gate = xt.chunk(2, dim=-1)
    out_t = h * torch.nn.functional.gelu(gate)  # diffusers' GEGLU
    out_t.backward(torch.tensor(d_out))
    for fn in (_geglu, geglu_recomputing):
        out, vjp = jax.vjp(fn, jnp.asarray(x))
        assert _rel(out, out_t.detach().numpy()) < 1e-6, fn
        assert _rel(vjp(jnp.asarray(d_out))[0], xt.grad.numpy()) < 1e-6, fn
    np.testing.assert_array_equal(geglu_recomputing(jnp.asarray(x)), _geglu(jnp.asarray(x)))  # same forward
    # bfloat16: the recomputed backward rounds like autodiff's (both 0.3-0.4% from torch's float32; 0.5 + 0.5 erf
    # loses the smallest CDFs' precision, whose terms are as small)
    errors = []
    for fn in (_geglu, geglu_recomputing):
        _, vjp = jax.vjp(fn, jnp.asarray(x, jnp.bfloat16))
        errors.append(_rel(vjp(jnp.asarray(d_out, jnp.bfloat16))[0].astype(jnp.float32), xt.grad.numpy()))
    assert errors[1] < 1.2 * errors[0] < 1e-2, errors


def test_the_module_recomputes_only_when_targeted_at_tpu():
    ff = GEGLU(8, 16, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 3, 8))

    def backward_primitives(module):
        jaxpr = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(module(x))))(x).jaxpr
        return {eqn.primitive.name for eqn in jaxpr.eqns}

    assert "erf" not in backward_primitives(ff)  # autodiff of the erfc GELU shares the forward's erfc
    ff.recompute_gate = True
    assert "erf" in backward_primitives(ff)  # the CDF again, as erf

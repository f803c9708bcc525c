"""Initialisers: PyTorch-default uniform weights drawn without a program per shape, bit for bit what
`jax.random.uniform` draws for that shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ipadapter_jax.models import layers

SHAPES = [(1,), (7,), (32, 3), (3, 3, 4, 8), (257, 255), (3, 3, 64, 128), (1 << 16,), ((1 << 16) + 1,), (513, 511)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_uniform_init_is_jax_random_uniform_bit_for_bit(dtype):
    for i, shape in enumerate(SHAPES):
        key, bound = jax.random.key(i), 1.0 / np.sqrt(shape[-1] * 3 + i)
        ours = layers.uniform_init(key, shape, bound, dtype)
        reference = jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
        assert ours.shape == shape and ours.dtype == reference.dtype
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference), err_msg=str(shape))
    traced = jax.jit(lambda k: layers.uniform_init(k, (5, 6), 0.3, dtype))(jax.random.key(9))  # a model in jit
    np.testing.assert_array_equal(traced, jax.random.uniform(jax.random.key(9), (5, 6), jnp.float32, -0.3, 0.3)
                                  .astype(dtype))


def test_a_model_draws_its_weights_with_a_few_programs():
    before = layers._draw_uniform._cache_size()
    layers.Linear(3, 5, rngs=nnx.Rngs(0))
    layers.Conv2d(320, 640, rngs=nnx.Rngs(1))  # 1.8M weights: a longer draw, its own program
    layers.Conv2d(4, 8, rngs=nnx.Rngs(2))
    layers.Linear(7, 11, use_bias=False, rngs=nnx.Rngs(3))
    assert layers._draw_uniform._cache_size() - before <= 2  # MIN_DRAW numbers, and 2**21


def _torch_grads(fn, x, scale, bias, d_out):
    import torch

    xt, st, bt = (torch.tensor(a, requires_grad=True) for a in (x, scale, bias))
    out = fn(xt, st, bt)
    out.backward(torch.tensor(d_out))
    return out.detach().numpy(), [t.grad.numpy() for t in (xt, st, bt)]


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("norm", ["group", "layer"])
def test_normalizations_match_torch_forward_and_gradients(norm, recompute):
    """Both backwards (autodiff, and the TPU one that normalizes x again from its float32 statistics) give torch's
    gradients for the input, the scale and the bias."""
    import torch

    rng = np.random.default_rng(1)
    if norm == "group":
        x = (rng.standard_normal((2, 6, 5, 32)) * 3 + 1).astype(np.float32)  # NHWC, 8 groups of 4 channels
        module = layers.GroupNorm(8, 32, eps=1e-6)

        def reference(xt, st, bt):
            return torch.nn.functional.group_norm(xt.permute(0, 3, 1, 2), 8, st, bt, 1e-6).permute(0, 2, 3, 1)
    else:
        x = (rng.standard_normal((2, 7, 32)) * 3 + 1).astype(np.float32)
        module = layers.LayerNorm(32)

        def reference(xt, st, bt):
            return torch.nn.functional.layer_norm(xt, (32,), st, bt, 1e-5)
    scale, bias = (rng.standard_normal(32).astype(np.float32) for _ in range(2))
    module.scale[...], module.bias[...] = jnp.asarray(scale), jnp.asarray(bias)
    module.recompute_normalized = recompute
    d_out = rng.standard_normal(x.shape).astype(np.float32)
    out_ref, grads_ref = _torch_grads(reference, x, scale, bias, d_out)
    graphdef, state = nnx.split(module)

    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    out, vjp = jax.vjp(apply, state, jnp.asarray(x))
    assert _rel(out, out_ref) < 1e-6
    d_state, d_x = vjp(jnp.asarray(d_out))
    assert _rel(d_x, grads_ref[0]) < 1e-5
    assert _rel(d_state["scale"][...], grads_ref[1]) < 1e-5
    assert _rel(d_state["bias"][...], grads_ref[2]) < 1e-5


@pytest.mark.parametrize("offset", [1.0, 30.0])
@pytest.mark.parametrize("norm", ["group", "layer"])
def test_tpu_normalizations_of_bfloat16_take_one_pass_statistics_as_accurately(norm, offset):
    """TPU programs take the statistics of 16-bit x in one pass, E[x^2] - E[x]^2 (layers._normalize_one_pass).
    Its float32 cancellation (mean^2 / variance = offset^2 / 9 here, times 2^-24) stays far below bfloat16's
    output rounding: against torch's float32 on the same bfloat16 input, the output and the input gradient are
    as accurate as the two-pass path's. A wrong variance would be off by the mean's square."""
    import torch

    rng = np.random.default_rng(2)
    x = jnp.asarray((rng.standard_normal((2, 64, 320)) * 3 + offset).astype(np.float32), jnp.bfloat16)
    x32 = np.asarray(x.astype(jnp.float32))
    scale, bias = (rng.standard_normal(320).astype(np.float32) for _ in range(2))
    d_out = rng.standard_normal(x.shape).astype(np.float32)
    if norm == "group":
        module, x_in, x_ref = layers.GroupNorm(32, 320, eps=1e-6), x.reshape(2, 8, 8, 320), x32.reshape(2, 8, 8, 320)

        def reference(xt, st, bt):
            return torch.nn.functional.group_norm(xt.permute(0, 3, 1, 2), 32, st, bt, 1e-6).permute(0, 2, 3, 1)
    else:
        module, x_in, x_ref = layers.LayerNorm(320), x, x32

        def reference(xt, st, bt):
            return torch.nn.functional.layer_norm(xt, (320,), st, bt, 1e-5)
    d_out = d_out.reshape(x_ref.shape)
    out_ref, grads_ref = _torch_grads(reference, x_ref, scale, bias, d_out)
    module.scale[...], module.bias[...] = jnp.asarray(scale), jnp.asarray(bias)
    errors = {}
    for recompute in (False, True):
        module.recompute_normalized = recompute
        out, vjp = jax.vjp(lambda x: module(x), x_in)
        (d_x,) = vjp(jnp.asarray(d_out, jnp.bfloat16))
        errors[recompute] = (_rel(out.astype(jnp.float32), out_ref), _rel(d_x.astype(jnp.float32), grads_ref[0]))
    assert max(errors[False]) < 6e-3  # bfloat16 rounding, both paths
    for ours, two_pass in zip(errors[True], errors[False], strict=True):
        assert ours <= 1.1 * two_pass, errors

"""The GEMM input gradient of `conv2d` (used on CPU where kernels dwarf activations) equals XLA's own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_models import rel_err as _rel

from ipadapter_jax.models import conv


@pytest.mark.parametrize(("shape", "kernel", "padding"), [
    ((2, 4, 4, 24), 3, 1),   # an SD UNet's 8x8/16x16 1280-channel case in miniature
    ((1, 6, 5, 8), 5, 2),    # non-square activation, 5x5 taps
])
def test_gemm_input_gradient_matches_xla(shape, kernel, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel, kernel, shape[-1], 40)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((*shape[:3], 40)), jnp.float32)
    assert conv._gemm_gradient_pays(x, w, 1, padding)  # the custom path is the one under test

    def ours(x, w):
        return jnp.sum(conv.conv2d(x, w, padding=padding, cpu_gemm_gradient=True) * g)

    def xla(x, w):
        return jnp.sum(conv._conv(x, w, 1, padding, None) * g)

    np.testing.assert_allclose(conv.conv2d(x, w, padding=padding, cpu_gemm_gradient=True),
                               conv._conv(x, w, 1, padding, None), rtol=0, atol=0)
    (dx, dw), (ref_dx, ref_dw) = jax.jit(jax.grad(ours, (0, 1)))(x, w), jax.jit(jax.grad(xla, (0, 1)))(x, w)
    assert _rel(dx, ref_dx) < 1e-6
    assert _rel(dw, ref_dw) < 1e-6


def test_bfloat16_gradient_keeps_dtypes_and_values():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 4, 4, 16)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, 3, 16, 32)) * 0.1, jnp.bfloat16)

    def loss(fn):
        return lambda x: jnp.sum(fn(x).astype(jnp.float32) ** 2)

    dx = jax.grad(loss(lambda x: conv.conv2d(x, w, padding=1, accumulate=jnp.float32, cpu_gemm_gradient=True)))(x)
    ref = jax.grad(loss(lambda x: conv._conv(x, w, 1, 1, jnp.float32)))(x)
    assert dx.dtype == jnp.bfloat16
    assert _rel(dx.astype(jnp.float32), ref.astype(jnp.float32)) < 1e-2  # bf16 rounding of the cotangent


def test_large_activations_keep_xla_gradient():
    x = jnp.zeros((2, 64, 64, 32))
    w = jnp.zeros((3, 3, 32, 32))
    assert not conv._gemm_gradient_pays(x, w, 1, 1)
    assert not conv._gemm_gradient_pays(jnp.zeros((1, 2, 2, 64)), jnp.zeros((3, 3, 64, 64)), 2, 1)  # strided

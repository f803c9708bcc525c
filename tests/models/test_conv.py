"""The CPU paths of `conv2d` equal XLA's convolution: the GEMM input gradient (where kernels dwarf activations)
and the bfloat16 tap products (wide bfloat16 inputs), forward and gradients."""

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
        return jnp.sum(conv.conv2d(x, w, padding=padding, for_cpu=True) * g)

    def xla(x, w):
        return jnp.sum(conv._conv(x, w, 1, padding, None) * g)

    np.testing.assert_allclose(conv.conv2d(x, w, padding=padding, for_cpu=True),
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

    dx = jax.grad(loss(lambda x: conv.conv2d(x, w, padding=1, accumulate=jnp.float32, for_cpu=True)))(x)
    ref = jax.grad(loss(lambda x: conv._conv(x, w, 1, 1, jnp.float32)))(x)
    assert dx.dtype == jnp.bfloat16
    assert _rel(dx.astype(jnp.float32), ref.astype(jnp.float32)) < 1e-2  # bf16 rounding of the cotangent


def test_large_activations_keep_xla_gradient():
    x = jnp.zeros((2, 64, 64, 32))
    w = jnp.zeros((3, 3, 32, 32))
    assert not conv._gemm_gradient_pays(x, w, 1, 1)
    assert not conv._gemm_gradient_pays(jnp.zeros((1, 2, 2, 64)), jnp.zeros((3, 3, 64, 64)), 2, 1)  # strided


def test_bfloat16_tap_products_match_xla_forward_and_gradients():
    """Both sum the same bfloat16 products in float32, so they differ by float32 summation order alone; the
    input channels (640) are the fewest that take this path."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 4, 5, 640)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, 3, 640, 16)) * 0.05, jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((2, 4, 5, 16)), jnp.float32)
    assert conv._tap_dots_pay(x, w, 1, 1)
    assert not conv._tap_dots_pay(x.astype(jnp.float32), w.astype(jnp.float32), 1, 1)  # float32: Eigen is faster
    assert not conv._tap_dots_pay(x[..., :320], w[:, :, :320], 1, 1)  # narrow inputs: Eigen is faster
    assert not conv._tap_dots_pay(x, w, 2, 1)  # strided

    def ours(x, w):
        return conv.conv2d(x, w, padding=1, accumulate=jnp.float32, for_cpu=True)

    def xla(x, w):
        return conv._conv(x, w, 1, 1, jnp.float32)

    assert "cpu_tap_dots_conv" in jax.jit(ours).lower(x, w).as_text(debug_info=True)
    out, ref = jax.jit(ours)(x, w), jax.jit(xla)(x, w)
    assert out.dtype == jnp.float32 and _rel(out, ref) < 1e-6
    assert conv.conv2d(x, w, padding=1, for_cpu=True).dtype == jnp.bfloat16  # no accumulate: the input's dtype

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w) * g)

    (dx, dw), (ref_dx, ref_dw) = jax.jit(jax.grad(loss(ours), (0, 1)))(x, w), jax.jit(jax.grad(loss(xla), (0, 1)))(x, w)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    # Gradients come back in bfloat16: each side rounds its float32 sums once, so they may differ by a rounding.
    assert _rel(dx.astype(jnp.float32), ref_dx.astype(jnp.float32)) < 2 ** -8
    assert _rel(dw.astype(jnp.float32), ref_dw.astype(jnp.float32)) < 2 ** -8


@pytest.mark.parametrize("shape", [(2, 32, 32, 8), (1, 32, 40, 4)])
def test_subpixel_upsample_conv_matches_upsample_then_conv(shape):
    """The sub-pixel form sums kernel taps before multiplying: float32 rounding apart, the same numbers and
    gradients as upsampling and convolving."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, shape[-1], 16)) / np.sqrt(9 * shape[-1]), jnp.float32)
    g = jnp.asarray(rng.standard_normal((shape[0], 2 * shape[1], 2 * shape[2], 16)), jnp.float32)

    def ours(x, w):
        return conv.upsample2x_conv(x, w, for_cpu=True)

    def xla(x, w):
        return conv._conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), w, 1, 1, None)

    assert "cpu_subpixel_upsample" in jax.jit(ours).lower(x, w).as_text(debug_info=True)
    # Bounds: the single-module target. The kernel gradient sums over 2048 positions per tap, where float32
    # summation order alone can reach a few 1e-6 (measured here: 4.5e-7); a wrong tap mapping gives O(1).
    assert _rel(jax.jit(ours)(x, w), jax.jit(xla)(x, w)) < 1e-5

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w) * g)

    (dx, dw), (ref_dx, ref_dw) = jax.jit(jax.grad(loss(ours), (0, 1)))(x, w), jax.jit(jax.grad(loss(xla), (0, 1)))(x, w)
    assert _rel(dx, ref_dx) < 1e-5 and _rel(dw, ref_dw) < 1e-5


def test_subpixel_upsample_only_where_it_pays():
    def text(x, **kw):
        w = jnp.zeros((3, 3, 8, 8), x.dtype)
        return jax.jit(lambda x, w: conv.upsample2x_conv(x, w, **kw)).lower(x, w).as_text(debug_info=True)

    big = jnp.zeros((1, 32, 32, 8))
    assert "cpu_subpixel_upsample" not in text(big)  # not compiled for CPU
    assert "cpu_subpixel_upsample" not in text(big.astype(jnp.bfloat16), for_cpu=True)  # bfloat16: the plain form
    assert "cpu_subpixel_upsample" not in text(jnp.zeros((1, 16, 16, 8)), for_cpu=True)  # small: the 2x2 convs lose
    assert "cpu_subpixel_upsample" in text(big, for_cpu=True)


def test_upsample2d_matches_diffusers():
    """Upsample2D (nearest 2x, then its 3x3 convolution) built for CPU, where it takes the sub-pixel form, against
    diffusers' Upsample2D with the same weights."""
    import torch
    from diffusers.models.upsampling import Upsample2D as TorchUpsample2D
    from flax import nnx

    from ipadapter_jax.models.resnet import Upsample2D
    from ipadapter_jax.models.target import set_target

    ours = Upsample2D(8, rngs=nnx.Rngs(0))
    set_target(ours, "cpu")
    ref = TorchUpsample2D(8, use_conv=True)
    with torch.no_grad():
        ref.conv.weight.copy_(torch.from_numpy(np.asarray(ours.conv.kernel[...]).transpose(3, 2, 0, 1).copy()))
        ref.conv.bias.copy_(torch.from_numpy(np.asarray(ours.conv.bias[...])))
    x = np.random.default_rng(4).standard_normal((2, 32, 36, 8)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    step = jax.jit(lambda x: ours(x))
    assert "cpu_subpixel_upsample" in step.lower(jnp.asarray(x)).as_text(debug_info=True)
    assert _rel(step(jnp.asarray(x)), expected) < 1e-5

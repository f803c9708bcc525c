"""Leaf layers shared by every model: Linear, Conv2d, GroupNorm, LayerNorm, Embed, activations.

Parameters are stored in the dtype chosen at load time. Matmuls and convolutions accumulate in float32
(on CPU a bfloat16 matmul with a bfloat16 result is several times slower than one accumulating in float32)
and normalisations compute in float32; outputs return to the input dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.errors import ConfigError
from ipadapter_jax.models.conv import conv2d, upsample2x_conv


class IPAdapterParam(nnx.Param):
    """A trainable IP-Adapter weight (image projection, `to_k_ip`/`to_v_ip`): select by type, never by name."""


_SHAPES_ONLY = contextvars.ContextVar("ipadapter_jax_shapes_only", default=False)


@contextlib.contextmanager
def shapes_only():
    """Within this block initialisers return `ShapeDtypeStruct`s instead of drawing random numbers: a model built
    to load a checkpoint into computes nothing (see `abstract_model`)."""
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


def abstract_model(build):
    """`build()`'s module with `ShapeDtypeStruct` leaves: nothing computed, nothing initialised.

    Built directly rather than traced under `nnx.eval_shape`: the initialisers give shapes, and the few arrays a
    constructor makes itself (norm scales, RNG keys) are replaced by their shapes. Tracing the construction took
    0.4 s for an SD1.5 UNet on a 2-core AMD EPYC, building it directly 0.2 s."""
    with shapes_only():
        module = build()
    state = nnx.state(module, nnx.Variable)
    nnx.update(module, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, jax.Array) else x, state))
    return module


MIN_DRAW = 1 << 16  # uniform numbers drawn at least (`uniform_init`)


@functools.partial(jax.jit, static_argnames=("size", "dtype"))
def _draw_uniform(key, bound, *, size: int, dtype):
    return jax.random.uniform(key, (size,), jnp.float32, -bound, bound).astype(dtype)


def uniform_init(key, shape: tuple[int, ...], bound: float, dtype) -> jax.Array:
    """`jax.random.uniform(key, shape, float32, -bound, bound).astype(dtype)`, bit for bit, without a program per
    shape.

    Drawn shape by shape, every new shape compiled its own threefry program (about 0.2 s each: 42 of them, 9 of
    the 11 s, built the first small UNet of a process on a 2-core AMD EPYC). With JAX's partitionable threefry
    (its default) the first n numbers of a longer draw are the n numbers drawn alone, laid out as a reshape lays
    them, so this draws a power of two of at least MIN_DRAW and keeps the prefix: a few programs for any model
    (tests/models/test_layers.py checks the values). Traced keys (a model built inside `jit`) draw directly."""
    n = math.prod(shape)
    if isinstance(key, jax.core.Tracer) or not jax.config.jax_threefry_partitionable:
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
    size = max(MIN_DRAW, 1 << max(n - 1, 0).bit_length())
    drawn = _draw_uniform(key, jnp.float32(bound), size=size, dtype=jnp.dtype(dtype))
    return jnp.asarray(np.asarray(drawn)[:n].reshape(shape))  # sliced on the host: no program per shape


def _uniform(rngs: nnx.Rngs, shape, bound: float, dtype):
    # PyTorch's default Linear/Conv init, so adapters trained from scratch start as the official code does.
    if _SHAPES_ONLY.get():
        return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
    return uniform_init(rngs.params(), tuple(shape), bound, dtype)


def normal_init(rngs: nnx.Rngs, shape, std: float, dtype):
    # Drawn shape by shape: a prefix of a longer normal draw differed from the shape's own draw in the last bits
    # (float32, measured), and only embeddings and the Resampler's latents use it.
    if _SHAPES_ONLY.get():
        return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
    return (jax.random.normal(rngs.params(), shape) * std).astype(dtype)


def _filled(value: float, shape, dtype):
    """A constant initial weight (norm scales and biases): its shape alone while `shapes_only`, so that building a
    model to load into dispatches no computation (550 small eager fills, each compiled per new shape, took about
    0.3 s of an SD1.5 pipeline load on a 2-core AMD EPYC)."""
    if _SHAPES_ONLY.get():
        return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
    return jnp.full(shape, value, dtype)


def _accumulate(x: jax.Array) -> jnp.dtype | None:
    return jnp.float32 if x.dtype in (jnp.bfloat16, jnp.float16) else None


class Linear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, dtype=jnp.float32,
                 rngs: nnx.Rngs, param_type: type[nnx.Param] = nnx.Param):
        bound = 1.0 / math.sqrt(in_features)
        self.kernel = param_type(_uniform(rngs, (in_features, out_features), bound, dtype))
        self.bias = param_type(_uniform(rngs, (out_features,), bound, dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        return linear(x, self.kernel[...], None if self.bias is None else self.bias[...])


def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """`x @ kernel + bias` over x's last axis, as `Linear` computes it: in x's dtype, accumulating 16-bit inputs
    in float32 and adding the bias before the one rounding."""
    y = jax.lax.dot_general(x, kernel.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())),
                            preferred_element_type=_accumulate(x))
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y.astype(x.dtype)


class Conv2d(nnx.Module):
    """NHWC convolution with an HWIO kernel (PyTorch OIHW on disk)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1,
                 padding: int = 0, use_bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.kernel = nnx.Param(_uniform(rngs, (kernel_size, kernel_size, in_channels, out_channels), bound, dtype))
        self.bias = nnx.Param(_uniform(rngs, (out_channels,), bound, dtype)) if use_bias else None
        self.stride = stride
        self.padding = padding
        self.for_cpu = False  # static; True only in models compiled for CPU (models/target.py, models/conv.py)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(x_BHWC.dtype)
        if kernel.shape[:2] == (1, 1) and self.stride == 1:
            y = jax.lax.dot_general(x_BHWC, kernel[0, 0], (((3,), (0,)), ((), ())),
                                    preferred_element_type=_accumulate(x_BHWC))
        else:
            y = conv2d(x_BHWC, kernel, stride=self.stride, padding=self.padding,
                       accumulate=_accumulate(x_BHWC), for_cpu=self.for_cpu)
        return self._biased(y, x_BHWC.dtype)

    def upsampled(self, x_BHWC: jax.Array) -> jax.Array:
        """This (3x3, stride 1, padding 1) convolution of the nearest 2x upsample of `x` (Upsample2D), in the
        sub-pixel form where that pays (models/conv.py)."""
        kernel = self.kernel[...].astype(x_BHWC.dtype)
        y = upsample2x_conv(x_BHWC, kernel, accumulate=_accumulate(x_BHWC), for_cpu=self.for_cpu)
        return self._biased(y, x_BHWC.dtype)

    def _biased(self, y: jax.Array, dtype) -> jax.Array:
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y.astype(dtype)


def _normalize(x32, axes, eps):
    """(x - mean) * rstd over `axes` of float32 `x32`, with mean and rstd (kept dims)."""
    mean = x32.mean(axis=axes, keepdims=True)
    centered = x32 - mean
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(centered), axis=axes, keepdims=True) + eps)
    return centered * rstd, mean, rstd


def _normalize_one_pass(x32, axes, eps):
    """`_normalize` with the variance as E[x^2] - E[x]^2: both sums in one read of x, which XLA's TPU fusion
    joins into the producer's epilogue (the two-pass form reads x again for the centered squares). It loses
    float32 precision to cancellation by the factor mean^2 / variance; used only for 16-bit x, whose output
    rounding (2^-9) stays larger unless |mean| exceeds about 180 standard deviations (flax's own LayerNorm
    computes its variance this way by default)."""
    mean = jnp.mean(x32, axis=axes, keepdims=True)
    variance = jnp.maximum(jnp.mean(jnp.square(x32), axis=axes, keepdims=True) - jnp.square(mean), 0.0)
    rstd = jax.lax.rsqrt(variance + eps)
    return (x32 - mean) * rstd, mean, rstd


def norm_with_stats(x, scale, bias, axes, eps, *, tpu: bool = False):
    """(normalized x, scaled and shifted, in x's dtype; (mean, rstd) in float32 with kept dims)."""
    one_pass = tpu and jnp.dtype(x.dtype).itemsize < 4  # TPU programs: one pass for 16-bit x
    xhat, mean, rstd = (_normalize_one_pass if one_pass else _normalize)(x.astype(jnp.float32), axes, eps)
    return (xhat * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype), (mean, rstd)


def _norm(x, scale, bias, axes, eps):
    """Normalization over `axes` (statistics in float32, as torch computes them), then scale and bias, which cover
    x's trailing axes."""
    return norm_with_stats(x, scale, bias, axes, eps)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _norm_recomputing(x, scale, bias, axes, eps):
    """`_norm` as TPU programs compute it: statistics of 16-bit x in one pass (`_normalize_one_pass`), and a
    backward that keeps only x and the float32 statistics and normalizes x again. Differentiated plainly, XLA's
    TPU fusion keeps float32 copies of the centered input for the backward (SD1.5 training at 32 per chip on v5p:
    up to 0.3 GB per layer, written and read back); x is alive anyway, in its own dtype."""
    return norm_with_stats(x, scale, bias, axes, eps, tpu=True)[0]


def _norm_fwd(x, scale, bias, axes, eps):
    y, stats = norm_with_stats(x, scale, bias, axes, eps, tpu=True)
    return y, (x, scale, bias, stats)


def normalized_grad(dxhat, xhat, rstd, axes):
    """The input gradient of `xhat = (x - mean) * rstd` over `axes`, from the gradient of xhat (float32)."""
    return rstd * (dxhat - jnp.mean(dxhat, axis=axes, keepdims=True)
                   - xhat * jnp.mean(dxhat * xhat, axis=axes, keepdims=True))


def _norm_bwd(axes, eps, residuals, dy):
    x, scale, bias, (mean, rstd) = residuals
    xhat = (x.astype(jnp.float32) - mean) * rstd
    dy32 = dy.astype(jnp.float32)
    dx = normalized_grad(dy32 * scale.astype(jnp.float32), xhat, rstd, axes)
    leading = tuple(range(x.ndim - scale.ndim))  # the scale and bias cover the trailing axes
    d_scale, d_bias = jnp.sum(dy32 * xhat, axis=leading), jnp.sum(dy32, axis=leading)
    return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


_norm_recomputing.defvjp(_norm_fwd, _norm_bwd)


class GroupNorm(nnx.Module):
    """GroupNorm over a channels-last tensor, statistics in float32 (as torch computes them)."""

    def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-5, dtype=jnp.float32, rngs=None):
        del rngs
        self.scale = nnx.Param(_filled(1.0, (num_channels,), dtype))
        self.bias = nnx.Param(_filled(0.0, (num_channels,), dtype))
        self.num_groups = num_groups
        self.eps = eps
        self.recompute_normalized = False  # static; True in models compiled for TPU (models/target.py)

    def __call__(self, x: jax.Array) -> jax.Array:
        groups = (self.num_groups, x.shape[-1] // self.num_groups)
        norm = _norm_recomputing if self.recompute_normalized else _norm
        return norm(x.reshape(x.shape[0], -1, *groups), self.scale[...].reshape(groups),
                    self.bias[...].reshape(groups), (1, 3), self.eps).reshape(x.shape)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-5, use_affine: bool = True, dtype=jnp.float32, rngs=None,
                 param_type: type[nnx.Param] = nnx.Param):
        del rngs
        self.scale = param_type(_filled(1.0, (dim,), dtype)) if use_affine else None
        self.bias = param_type(_filled(0.0, (dim,), dtype)) if use_affine else None
        self.eps = eps
        self.recompute_normalized = False  # static; True in models compiled for TPU (models/target.py)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.scale is None:
            return _normalize(x.astype(jnp.float32), (-1,), self.eps)[0].astype(x.dtype)
        norm = _norm_recomputing if self.recompute_normalized else _norm
        return norm(x, self.scale[...], self.bias[...], (-1,), self.eps)


class Embed(nnx.Module):
    def __init__(self, num_embeddings: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.embedding = nnx.Param(normal_init(rngs, (num_embeddings, dim), 0.02, dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as torch's nn.GELU() and diffusers' "gelu"."""
    return jax.nn.gelu(x, approximate=False)


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


def activation(name: str):
    table = {"silu": jax.nn.silu, "swish": jax.nn.silu, "gelu": gelu, "quick_gelu": quick_gelu,
             "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True), "relu": jax.nn.relu}
    if name not in table:
        raise ConfigError(f"activation {name!r} is not supported (supported: {', '.join(sorted(table))}).")
    return table[name]

"""The backward of a transformer block's feed-forward branch, `x + FF(LayerNorm(x))` with a GEGLU FF, as one TPU
kernel per call, tokens in the lanes.

With `y = [h, gate] = LayerNorm(x) @ W1 + b1` and `out = x + (h * gelu(gate)) @ W2 + b2`, the input gradient is

    d_geglu = d_out @ W2^T                                   (XLA)
    d(h, gate) = [d_geglu * gelu(gate), d_geglu * h * gelu'(gate)]
    dx = d_out + LayerNorm's backward of d(h, gate) @ W1^T   (the kernel)

Left to XLA, the TPU program writes the 2F-wide d(h, gate) to HBM from the epilogue of the product that makes
d_geglu and reads it back for `@ W1^T` (at SD1.5's 64x64 level that product moves 2.1 GB per call at 48 images
per chip, twice what its matrix work needs), then reads the result again for LayerNorm's two sums, and once more
with x and d_out for the residual's gradient. The kernel reads d_geglu, h, gate, x and d_out once and writes dx:
each grid step has every channel of a block of tokens, so LayerNorm's sums over the channels stay on chip. The
UNet's weights are frozen in training, so the kernel is the whole input gradient there; the parameters' gradients
(XLA, below it) only exist for callers that differentiate them and are dropped by the compiler otherwise.

Layout: XLA keeps the UNet's 64x64 transformer activations with the tokens minor (`{1,2,0}`, as
`pallas_tokens.py` uses them), so the kernel takes (B, F, L) and (B, C, L) views, and each grid step multiplies W1
(C, 2F) by a (2F, block) slab of d(h, gate): a plain matrix product with a 2F-deep contraction. It applies where
W1 fits the kernel's VMEM budget (`fits`: SD1.5's 64x64 level, 320 -> 2 x 1280); elsewhere XLA's backward runs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ipadapter_jax.models.layers import linear, norm_with_stats, normalized_grad
from ipadapter_jax.models.pallas_attention import traced_mesh_axes
from ipadapter_jax.models.transformer import _geglu, geglu_grads

KERNEL_NAME = "ipadapter_ff_dx"
BLOCK_L = 256  # tokens per grid step
# W1 (C, 2F) stays in VMEM for the whole call, double-buffered by Pallas; beyond this it would crowd out the
# (F, BLOCK_L) input blocks under the compiler's default 16 MiB scoped VMEM (SD1.5 64x64: 320 x 2560 bf16, 1.6 MiB).
MAX_WEIGHT_BYTES = 2 * 2**20


def fits(tokens: int, channels: int, inner: int, dtype) -> bool:
    """Whether the kernel takes a feed-forward of `channels` -> 2 x `inner` over `tokens` tokens in `dtype`."""
    return (tokens % BLOCK_L == 0 and inner % 128 == 0 and channels % 8 == 0
            and channels * 2 * inner * jnp.dtype(dtype).itemsize <= MAX_WEIGHT_BYTES)


def costs(batch: int, tokens: int, channels: int, inner: int, itemsize: int) -> pl.CostEstimate:
    """What the kernel does: the 2F-deep product, an erf and an exp per gate, one read of d_geglu, h, gate, x,
    d_out, the float32 statistics and W1 (its block index never changes, so Pallas fetches it once per core), and
    one write of dx."""
    rows = batch * tokens
    return pl.CostEstimate(
        flops=2 * rows * 2 * inner * channels, transcendentals=2 * rows * inner,
        bytes_accessed=(rows * (3 * inner + 3 * channels) + 2 * inner * channels) * itemsize + rows * 2 * 4)


def _kernel(dg_ref, h_ref, gate_ref, w1h_ref, w1g_ref, x_ref, mean_ref, rstd_ref, scale_ref, d_out_ref, dx_ref):
    f32 = jnp.float32
    d_h, d_gate = geglu_grads(h_ref[0].astype(f32), gate_ref[0].astype(f32), dg_ref[0].astype(f32))  # (F, BLOCK_L)
    dtype = w1h_ref.dtype
    d_norm = jnp.dot(w1h_ref[...], d_h.astype(dtype), preferred_element_type=f32)
    d_norm = d_norm + jnp.dot(w1g_ref[...], d_gate.astype(dtype), preferred_element_type=f32)  # (C, BLOCK_L)
    rstd = rstd_ref[0]  # (1, BLOCK_L)
    xhat = (x_ref[0].astype(f32) - mean_ref[0]) * rstd
    dx = normalized_grad(d_norm * scale_ref[...], xhat, rstd, (0,))
    dx_ref[0] = (dx + d_out_ref[0].astype(f32)).astype(dx_ref.dtype)


def input_grad(d_geglu_BLF, y_BL2F, w1_C2F, x_BLC, mean_BL1, rstd_BL1, norm_scale_C, d_out_BLC, *,
               interpret: bool = False):
    """dx (B, L, C) of the branch for the output gradient `d_out`, from `d_geglu = d_out @ W2^T`, the projection
    `y`, W1, and LayerNorm's input and float32 statistics (mean, rstd: (B, L, 1)) and scale."""
    b, l, f = d_geglu_BLF.shape
    c = w1_C2F.shape[0]

    def tokens_minor(a):  # views of XLA's tokens-minor layout
        return jnp.swapaxes(a, 1, 2)

    slab = pl.BlockSpec((1, f, BLOCK_L), lambda i, j: (i, 0, j))
    gate = pl.BlockSpec((1, f, BLOCK_L), lambda i, j: (i, 1, j))
    channels = pl.BlockSpec((1, c, BLOCK_L), lambda i, j: (i, 0, j))
    stats = pl.BlockSpec((1, 1, BLOCK_L), lambda i, j: (i, 0, j))
    weights = [pl.BlockSpec((c, f), lambda i, j: (0, 0)), pl.BlockSpec((c, f), lambda i, j: (0, 1))]
    cost = costs(b, l, c, f, jnp.dtype(x_BLC.dtype).itemsize)
    w1 = w1_C2F.astype(d_geglu_BLF.dtype)  # dx^T (C, L) = W1 (C, 2F) @ d(h, gate)^T (2F, L)
    f32 = jnp.float32
    dx = pl.pallas_call(
        _kernel, grid=(b, l // BLOCK_L),
        in_specs=[slab, slab, gate, *weights, channels, stats, stats, pl.BlockSpec((c, 1), lambda i, j: (0, 0)),
                  channels],
        out_specs=channels, out_shape=jax.ShapeDtypeStruct((b, c, l), x_BLC.dtype),
        compiler_params=None if interpret else pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret, name=KERNEL_NAME, cost_estimate=cost,
        metadata={"useful_flops": str(int(cost.flops)), "layout": "tokens"},  # read by planning/report.py
    )(tokens_minor(d_geglu_BLF), tokens_minor(y_BL2F), tokens_minor(y_BL2F), w1, w1, tokens_minor(x_BLC),
      tokens_minor(mean_BL1.astype(f32)), tokens_minor(rstd_BL1.astype(f32)),
      norm_scale_C.astype(f32).reshape(c, 1), tokens_minor(d_out_BLC))
    return tokens_minor(dx)


def sharded_input_grad(*args, interpret: bool = False):
    """`input_grad` split over the batch on the mesh the program is traced under (a Mosaic kernel cannot be
    partitioned by the compiler), or None when the batch does not divide over it."""
    mesh, axes, size = traced_mesh_axes()
    body = functools.partial(input_grad, interpret=interpret)
    if size == 1:
        return body(*args)
    if args[0].shape[0] % size:
        return None
    split, whole = jax.sharding.PartitionSpec(axes, None, None), jax.sharding.PartitionSpec()
    specs = (split, split, whole, split, split, split, whole, split)  # W1 and the scale whole on every device
    if jax.sharding.AxisType.Explicit in mesh.axis_types:  # sharding in types: inputs must carry the split
        args = tuple(jax.sharding.reshard(a, s) for a, s in zip(args, specs, strict=True))
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=split, axis_names=set(axes),
                         check_vma=False)(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def feed_forward_branch(x_BLC, norm_scale, norm_bias, w1, b1, w2, b2, eps: float, interpret: bool):
    """`x + FF(LayerNorm(x))`, computed as `BasicTransformerBlock` computes it on TPU (LayerNorm's statistics as
    `layers.norm_with_stats` takes them there, `layers.linear`, GEGLU); its input gradient is the kernel above
    (`interpret`: Pallas' interpreter, for tests on any backend)."""
    return _fwd(x_BLC, norm_scale, norm_bias, w1, b1, w2, b2, eps, interpret)[0]


def _fwd(x, norm_scale, norm_bias, w1, b1, w2, b2, eps, interpret):
    normed, (mean, rstd) = norm_with_stats(x, norm_scale, norm_bias, (-1,), eps, tpu=True)
    y = linear(normed, w1, b1)
    return x + linear(_geglu(y), w2, b2), (x, mean, rstd, y, norm_scale, norm_bias, w1, b1, w2, b2)


def _bwd(eps, interpret, residuals, d_out):
    x, mean, rstd, y, norm_scale, norm_bias, w1, b1, w2, b2 = residuals
    f32 = jnp.float32
    d_geglu = linear(d_out, w2.T, None)
    dx = sharded_input_grad(d_geglu, y, w1, x, mean, rstd, norm_scale, d_out, interpret=interpret)
    # XLA from here: the parameters' gradients (dead code where they are frozen: the compiler drops them), and dx
    # where the batch does not divide over the mesh
    dy = jnp.concatenate(geglu_grads(*jnp.split(y, 2, axis=-1), d_geglu), axis=-1)
    d_norm = linear(dy, w1.T, None).astype(f32)
    xhat = (x.astype(f32) - mean) * rstd
    if dx is None:
        dx = (normalized_grad(d_norm * norm_scale.astype(f32), xhat, rstd, (-1,)) + d_out.astype(f32)).astype(x.dtype)
    normed = (xhat * norm_scale.astype(f32) + norm_bias.astype(f32)).astype(x.dtype)
    tokens = (0, 1)
    return (dx, jnp.sum(d_norm * xhat, tokens).astype(norm_scale.dtype),
            jnp.sum(d_norm, tokens).astype(norm_bias.dtype),
            jnp.einsum("blc,blf->cf", normed, dy, preferred_element_type=f32).astype(w1.dtype),
            jnp.sum(dy.astype(f32), tokens).astype(b1.dtype),
            jnp.einsum("blf,blc->fc", _geglu(y), d_out, preferred_element_type=f32).astype(w2.dtype),
            jnp.sum(d_out.astype(f32), tokens).astype(b2.dtype))


feed_forward_branch.defvjp(_fwd, _bwd)

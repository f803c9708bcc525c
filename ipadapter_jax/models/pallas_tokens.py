"""Attention with the tokens in the lanes: each head's queries, keys and values as (D, L) blocks, (B*H, D, L)
in HBM, which is how XLA's TPU layout already keeps the UNet's (B, L, H*D) projections at 64x64 and 32x32
latents (tokens minor, channels on sublanes: `{1,2,0}`). The transposes around the kernels then become views, and
a 40-wide head takes 40 sublanes (five 8-row tiles) instead of a whole 128-lane tile: the rows layout of
`pallas_attention.py` spends about a tenth of the SD1.5 training step on v5p copying q, k, v, o and their
gradients into (B*H, L, D) (bench/tpu_notes.md).

Only the whole-key-row kernels exist in this layout (keys up to `STORED_PROBS_MAX_KEYS`): the forward takes a
block of queries against the whole key row, computes the exact softmax and, under differentiation, writes P for
the backward; the backward reads P, takes the whole key row per query block, and gets rowsum(dO * O) as
rowsum(P * dP) on chip, so no per-row statistics cross HBM. q is scaled inside the kernels, in its own dtype, as
the XLA path scales it. The matrix unit does the same work as in the other layouts (the 40-wide contraction of
q k^T and the 40 rows of v^T P^T each use a third of it); the declared costs count it so.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ipadapter_jax.models.pallas_attention import KERNEL_NAMES, LANES, Tiling, _round_up, mask_padded_keys, useful_flops

# Query rows per grid step. The compiler's estimate is the same at 128 and 256 (the kernels are bound by the matrix
# unit), and 128 leaves room: SDXL's 64-wide heads at 256 rows need 16.3 MiB of scoped VMEM in the backward, over
# the compiler's default 16 MiB on v5p, which the kernels keep (pallas_attention._PROBS_BLOCK_Q).
BLOCK_Q = 128
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def token_costs(t: Tiling) -> dict[str, pl.CostEstimate]:
    """Declared costs (module note); the keys are `pallas_attention.KERNEL_NAMES`. k and v are read once per row:
    their block index does not change along the query blocks."""
    lsd = t.rows * t.q_len * t.kv_len * t.mxu_dim
    exps = t.rows * t.q_len * t.kv_len
    q_bytes = t.rows * t.q_len * t.head_dim * t.itemsize  # also o, do, dq
    k_bytes = t.rows * t.kv_len * t.head_dim * t.itemsize  # also v, dk, dv
    probs = t.rows * t.q_len * t.kv_len * t.itemsize
    return {
        KERNEL_NAMES[0]: pl.CostEstimate(flops=4 * lsd, transcendentals=exps, bytes_accessed=2 * q_bytes + 2 * k_bytes),
        KERNEL_NAMES[4]: pl.CostEstimate(flops=4 * lsd, transcendentals=exps,
                                         bytes_accessed=2 * q_bytes + 2 * k_bytes + probs),
        KERNEL_NAMES[5]: pl.CostEstimate(flops=8 * lsd, transcendentals=0,
                                         bytes_accessed=3 * q_bytes + 4 * k_bytes + probs),
    }


def _meta(t: Tiling, name: str) -> dict[str, str]:
    return {"useful_flops": str(useful_flops(t)[name]), "layout": "tokens"}


def _scaled(q_ref, scale):
    return q_ref[0] * jnp.asarray(scale, q_ref.dtype)


def _per_segment(x, t: Tiling, reduce):
    """`reduce` over the keys of each softmax segment (`Tiling.segments`) of (block_q, S) `x`, spread back over that
    segment's keys (and the padding past the last); one reduction over every key without segments."""
    if not t.segments:
        return reduce(x, axis=1, keepdims=True)
    cols = lax.broadcasted_iota(jnp.int32, x.shape, 1)
    fill = jnp.asarray(jnp.finfo(x.dtype).min if reduce is jnp.max else 0, x.dtype)
    out = reduce(jnp.where(cols < t.segments[0], x, fill), axis=1, keepdims=True)
    for start, end in zip(t.segments, (*t.segments[1:], t.kv_len), strict=True):
        inside = (cols >= start) & (cols < end)
        out = jnp.where(inside, reduce(jnp.where(inside, x, fill), axis=1, keepdims=True), out)
    return out


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, *p_ref, t: Tiling, scale: float):
    v = v_ref[0]
    s = _logits(q_ref, k_ref, t, scale)
    p = jnp.exp(s - _per_segment(s, t, jnp.max))
    p = p / _per_segment(p, t, jnp.sum)
    if p_ref:
        p_ref[0][0] = p.astype(p_ref[0].dtype)
    o_ref[0] = lax.dot_general(v, p.astype(v.dtype), _NT, preferred_element_type=jnp.float32).astype(o_ref.dtype)


def _logits(q_ref, k_ref, t: Tiling, scale: float):
    """(block_q, S) float32 logits from (D, block_q) queries and (D, S) keys, padded keys masked."""
    return mask_padded_keys(lax.dot_general(_scaled(q_ref, scale), k_ref[0], _TN, preferred_element_type=jnp.float32),
                            0, t)


def _bwd_kernel(q_ref, k_ref, v_ref, do_ref, p_ref, dq_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, t: Tiling,
                scale: float):
    """Grid (rows, query blocks): dK^T and dV^T accumulate over the query blocks, dQ^T is written per block."""
    qb = pl.program_id(1)

    @pl.when(qb == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    k, v, do = k_ref[0], v_ref[0], do_ref[0]
    p = p_ref[0].astype(jnp.float32)
    dp = lax.dot_general(do, v, _TN, preferred_element_type=jnp.float32)  # (block_q, S)
    ds = p * (dp - _per_segment(p * dp, t, jnp.sum))
    dv_sc[...] += lax.dot(do, p_ref[0].astype(do.dtype), preferred_element_type=jnp.float32)
    dk_sc[...] += lax.dot(_scaled(q_ref, scale), ds.astype(k.dtype), preferred_element_type=jnp.float32)
    dq = lax.dot_general(k, ds.astype(k.dtype), _NT, preferred_element_type=jnp.float32)
    dq_ref[0] = (dq * scale).astype(dq_ref.dtype)

    @pl.when(qb == t.q_len // t.block_q - 1)
    def _finish():
        dk_ref[0] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[0] = dv_sc[...].astype(dv_ref.dtype)


def _specs(t: Tiling):
    q_blocks = pl.BlockSpec((1, t.head_dim, t.block_q), lambda r, i: (r, 0, i))
    whole_keys = pl.BlockSpec((1, t.head_dim, t.kv_len), lambda r, i: (r, 0, 0))
    probs = pl.BlockSpec((1, t.block_q, t.kv_len), lambda r, i: (r, i, 0))
    return q_blocks, whole_keys, probs


def _forward(q, k, v, t: Tiling, scale: float, store: bool):
    q_blocks, whole_keys, probs = _specs(t)
    name = KERNEL_NAMES[4] if store else KERNEL_NAMES[0]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    out_specs = [q_blocks]
    if store:
        out_shape.append(jax.ShapeDtypeStruct((t.rows, t.q_len, t.kv_len), q.dtype))
        out_specs.append(probs)
    params = None if t.interpret else pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
    out = pl.pallas_call(
        functools.partial(_fwd_kernel, t=t, scale=scale), grid=(t.rows, t.q_len // t.block_q),
        in_specs=[q_blocks, whole_keys, whole_keys], out_specs=out_specs, out_shape=out_shape,
        compiler_params=params, interpret=t.interpret, name=name, metadata=_meta(t, name),
        cost_estimate=token_costs(t)[name])(q, k, v)
    return out if store else (out[0], None)


def _backward(q, k, v, do, p, t: Tiling, scale: float):
    q_blocks, whole_keys, probs = _specs(t)
    f32 = jnp.float32
    params = None if t.interpret else pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))
    name = KERNEL_NAMES[5]
    return pl.pallas_call(
        functools.partial(_bwd_kernel, t=t, scale=scale), grid=(t.rows, t.q_len // t.block_q),
        in_specs=[q_blocks, whole_keys, whole_keys, q_blocks, probs], out_specs=[q_blocks, whole_keys, whole_keys],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)],
        scratch_shapes=[pltpu.VMEM((t.head_dim, t.kv_len), f32), pltpu.VMEM((t.head_dim, t.kv_len), f32)],
        compiler_params=params, interpret=t.interpret, name=name, metadata=_meta(t, name),
        cost_estimate=token_costs(t)[name])(q, k, v, do, p)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def flash_tokens(q, k, v, t: Tiling, scale: float):
    """Attention of (B*H, D, Lp) queries over (B*H, D, Sp) keys and values (lengths padded to whole blocks and
    128 lanes; padded keys are masked); q is multiplied by `scale` in its dtype first."""
    return _forward(q, k, v, t, scale, store=False)[0]


def _flash_fwd(q, k, v, t: Tiling, scale: float):
    o, p = _forward(q, k, v, t, scale, store=True)
    return o, (q, k, v, p)


def _flash_bwd(t: Tiling, scale: float, residuals, do):
    q, k, v, p = residuals
    return _backward(q, k, v, do, p, t, scale)


flash_tokens.defvjp(_flash_fwd, _flash_bwd)


def tiling(q_shape, k_shape, dtype, *, segments: tuple[int, ...] = (), interpret: bool = False) -> Tiling:
    """The tiling of a call on queries (B, L, H, D) and keys (B, S, H, D): lengths padded to 128 lanes, query
    blocks of `BLOCK_Q` rows against the whole key row."""
    b, l, h, d = q_shape
    s = k_shape[1]
    if list(segments) != sorted(set(segments)) or not all(0 < x < s for x in segments):
        raise ValueError(f"key segments must start at increasing keys inside the {s} keys; got {segments}")
    lp, sp = _round_up(l, LANES), _round_up(s, LANES)
    return Tiling(rows=b * h, q_len=lp, kv_len=sp, kv_real=s, head_dim=d, block_q=min(BLOCK_Q, lp), block_k=sp,
                  itemsize=jnp.dtype(dtype).itemsize, interpret=interpret, q_real=l, head_real=d, heads=h,
                  segments=tuple(segments))


def tokens_attention(q_BLHD, k_BSHD, v_BSHD, *, segments: tuple[int, ...] = (), interpret: bool = False):
    """softmax(q k^T / sqrt(d)) v through the tokens-in-lanes kernels; keys at most one block (the caller checks).
    The transposes to (B*H, D, L) and back are views of the layout XLA keeps the projections in. With `segments`
    (where a new key set starts) each key set takes its own softmax and the outputs add up: the text and image
    branches of a decoupled cross-attention in one call, the image values already multiplied by their scale."""
    b, l, h, d = q_BLHD.shape
    t = tiling(q_BLHD.shape, k_BSHD.shape, q_BLHD.dtype, segments=segments, interpret=interpret)

    def heads_by_tokens(x_BXHD, length):
        x = jnp.transpose(x_BXHD, (0, 2, 3, 1)).reshape(b * h, d, x_BXHD.shape[1])
        return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2])))

    out = flash_tokens(heads_by_tokens(q_BLHD, t.q_len), heads_by_tokens(k_BSHD, t.kv_len),
                       heads_by_tokens(v_BSHD, t.kv_len), t, float(d) ** -0.5)
    return jnp.transpose(out[:, :, :l].reshape(b, h, d, l), (0, 3, 1, 2))

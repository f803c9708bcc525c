"""Flash attention with the heads left in the lanes: the kernels read q, k, v as the projections write them,
(B, L, H*D), and write the output the same way, each grid step looping over the H heads of its row block with
static lane slices. The "rows" layout of `pallas_attention.py` first transposes every operand to (B*H, L, D),
each a copy in HBM in which a 40- or 64-wide head fills a whole 128-lane tile; by the compiler's estimate those
copies and the 128-lane statistics cost SD1.5's 64x64 level about a fifth of its training time.

Statistics (log-sum-exp, and the backward's rowsum(dO * O)) are (B, L, H) float32. The matrix unit does the
same work as in the rows layout (each head's product is padded to 128 lanes in the MXU); declared costs count
it so, and the HBM bytes of (B, L, H*D) tensors with H*D rounded up to whole 128-lane tiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ipadapter_jax.models.pallas_attention import KERNEL_NAMES, LANES, Tiling, _masked_logits, _round_up, useful_flops

_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def lane_costs(t: Tiling) -> dict[str, pl.CostEstimate]:
    """Declared costs of the lanes-layout kernels (module note); the same keys as `pallas_attention.kernel_costs`."""
    lsd = t.rows * t.q_len * t.kv_len * t.mxu_dim
    exps = t.rows * t.q_len * t.kv_len
    batch = t.rows // t.heads
    width = _round_up(t.channels, LANES)
    q_bytes = batch * t.q_len * width * t.itemsize  # also o, do, dq
    k_bytes = batch * t.kv_len * width * t.itemsize  # also v, dk, dv
    stats = batch * t.q_len * LANES * 4  # (B, L, H) float32, H in one 128-lane tile
    n_q, n_k = t.q_len // t.block_q, t.kv_len // t.block_k
    return {
        KERNEL_NAMES[0]: pl.CostEstimate(flops=4 * lsd, transcendentals=exps + t.rows * t.q_len * n_k,
                                         bytes_accessed=2 * q_bytes + stats + n_q * 2 * k_bytes),
        KERNEL_NAMES[3]: pl.CostEstimate(flops=10 * lsd, transcendentals=exps,
                                         bytes_accessed=4 * k_bytes + q_bytes + n_k * (2 * q_bytes + 2 * stats)),
    }


def _vmem_limit(t: Tiling, backward: bool) -> int:
    """Scoped VMEM for one grid step: double-buffered blocks and the scratch, with room to spare."""
    width = _round_up(t.channels, LANES)
    head = _round_up(t.head_dim, LANES)
    q_block, k_block = t.block_q * width * t.itemsize, t.block_k * width * t.itemsize
    stat = t.block_q * LANES * 4
    if backward:
        need = 2 * (2 * q_block + 2 * k_block + 2 * stat) + 2 * t.q_len * width * t.itemsize + 4 * k_block
        need += t.q_len * width * 4 + 2 * t.heads * t.block_k * head * 4
    else:
        need = 2 * (2 * q_block + 2 * k_block + stat) + t.heads * t.block_q * (2 * LANES + head) * 4
    need += 8 * t.block_q * t.block_k * 4  # scores, probabilities and their gradients in flight
    return int(min(max(2 * need, 32 << 20), 100 << 20))


def _params(t: Tiling, semantics, backward: bool):
    if t.interpret:
        return None
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=_vmem_limit(t, backward))


def _lanes(per_head: list, t: Tiling):
    """Per-head (rows, D) blocks side by side in the lanes, zero-filled up to the operands' width."""
    pad = t.channels - t.heads * t.head_dim
    rows = per_head[0].shape[0]
    return jnp.concatenate(per_head + ([jnp.zeros((rows, pad), per_head[0].dtype)] if pad else []), axis=-1)


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, t: Tiling):
    kv = pl.program_id(2)
    d = t.head_dim

    @pl.when(kv == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    q, k, v = q_ref[0], k_ref[0], v_ref[0]
    for h in range(t.heads):
        cols = slice(h * d, (h + 1) * d)
        s = _masked_logits(q[:, cols], k[:, cols], kv, t)
        m_prev = m_sc[h]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        p = jnp.exp(s - m_new[:, :1])
        alpha = jnp.exp(m_prev - m_new)
        l_sc[h] = alpha * l_sc[h] + p.sum(axis=1, keepdims=True)
        acc_sc[h] = alpha[:, :1] * acc_sc[h] + lax.dot(p.astype(v.dtype), v[:, cols],
                                                       preferred_element_type=jnp.float32)
        m_sc[h] = m_new

    @pl.when(kv == t.kv_len // t.block_k - 1)
    def _finish():
        outs, lse = [], jnp.zeros((t.block_q, LANES), jnp.float32)
        lane = lax.broadcasted_iota(jnp.int32, lse.shape, 1)
        for h in range(t.heads):
            total = l_sc[h]
            outs.append(acc_sc[h] / total[:, :1])
            lse = jnp.where(lane == h, m_sc[h] + jnp.log(total), lse)
        o_ref[0] = _lanes(outs, t).astype(o_ref.dtype)
        lse_ref[0] = lse[:, :t.heads]


def _bwd_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref, dq_sc, dk_sc, dv_sc, *,
                t: Tiling):
    """Grid (batch, key blocks, query blocks): dK/dV of every head accumulate over the inner query blocks, dQ
    over the key blocks in a scratch holding the row's whole query length, written after the last key block."""
    kv, qb = pl.program_id(1), pl.program_id(2)
    d = t.head_dim
    rows = pl.ds(pl.multiple_of(qb * t.block_q, t.block_q), t.block_q)

    @pl.when((kv == 0) & (qb == 0))
    def _init_dq():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(qb == 0)
    def _init_dkv():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    q, k, v, do = q_ref[0], k_ref[0], v_ref[0], do_ref[0]
    lse, delta = lse_ref[0], delta_ref[0]
    for h in range(t.heads):
        cols = slice(h * d, (h + 1) * d)
        q_h, k_h, do_h = q[:, cols], k[:, cols], do[:, cols]
        p = jnp.exp(_masked_logits(q_h, k_h, kv, t) - lse[:, h:h + 1])
        dp = lax.dot_general(do_h, v[:, cols], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, h:h + 1])
        dv_sc[h] += lax.dot(p.T.astype(do.dtype), do_h, preferred_element_type=jnp.float32)
        dk_sc[h] += lax.dot(ds.T.astype(q.dtype), q_h, preferred_element_type=jnp.float32)
        dq_sc[rows, cols] += lax.dot(ds.astype(k.dtype), k_h, preferred_element_type=jnp.float32)

    @pl.when(qb == t.q_len // t.block_q - 1)
    def _finish_dkv():
        dk_ref[0] = _lanes([dk_sc[h] for h in range(t.heads)], t).astype(dk_ref.dtype)
        dv_ref[0] = _lanes([dv_sc[h] for h in range(t.heads)], t).astype(dv_ref.dtype)

    @pl.when(kv == t.kv_len // t.block_k - 1)
    def _finish_dq():
        dq_ref[0, rows, :] = dq_sc[rows, :].astype(dq_ref.dtype)


def _spec(block: int, width: int, axis: int):
    """Blocks of a (B, length, width) array indexed by grid axis `axis` (1: outer, 2: inner)."""
    return pl.BlockSpec((1, block, width), lambda b, i, j: (b, (i, j)[axis - 1], 0))


def _forward(q, k, v, t: Tiling):
    c = t.channels
    f32 = jnp.float32
    return pl.pallas_call(
        functools.partial(_fwd_kernel, t=t), grid=(t.rows // t.heads, t.q_len // t.block_q, t.kv_len // t.block_k),
        in_specs=[_spec(t.block_q, c, 1), _spec(t.block_k, c, 2), _spec(t.block_k, c, 2)],
        out_specs=[_spec(t.block_q, c, 1), _spec(t.block_q, t.heads, 1)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((*q.shape[:2], t.heads), f32)],
        scratch_shapes=[pltpu.VMEM((t.heads, t.block_q, LANES), f32), pltpu.VMEM((t.heads, t.block_q, LANES), f32),
                        pltpu.VMEM((t.heads, t.block_q, t.head_dim), f32)],
        compiler_params=_params(t, ("parallel", "parallel", "arbitrary"), False), interpret=t.interpret,
        name=KERNEL_NAMES[0], metadata=_meta(t, 0), cost_estimate=lane_costs(t)[KERNEL_NAMES[0]])(q, k, v)


def _backward(q, k, v, do, lse, delta, t: Tiling):
    c = t.channels
    f32 = jnp.float32
    whole = pl.BlockSpec((1, t.q_len, c), lambda b, i, j: (b, 0, 0))
    return pl.pallas_call(
        functools.partial(_bwd_kernel, t=t), grid=(t.rows // t.heads, t.kv_len // t.block_k, t.q_len // t.block_q),
        in_specs=[_spec(t.block_q, c, 2), _spec(t.block_k, c, 1), _spec(t.block_k, c, 1), _spec(t.block_q, c, 2),
                  _spec(t.block_q, t.heads, 2), _spec(t.block_q, t.heads, 2)],
        out_specs=[whole, _spec(t.block_k, c, 1), _spec(t.block_k, c, 1)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((t.q_len, c), f32), pltpu.VMEM((t.heads, t.block_k, t.head_dim), f32),
                        pltpu.VMEM((t.heads, t.block_k, t.head_dim), f32)],
        compiler_params=_params(t, ("parallel", "arbitrary", "arbitrary"), True), interpret=t.interpret,
        name=KERNEL_NAMES[3], metadata=_meta(t, 3),
        cost_estimate=lane_costs(t)[KERNEL_NAMES[3]])(q, k, v, do, lse, delta)


def _meta(t: Tiling, index: int) -> dict[str, str]:
    return {"useful_flops": str(useful_flops(t)[KERNEL_NAMES[index]]), "layout": "lanes"}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def flash_lanes(q, k, v, t: Tiling):
    """Attention of (B, Lp, H*D) queries over (B, Sp, H*D) keys and values, lengths padded to whole blocks."""
    return _forward(q, k, v, t)[0]


def _flash_fwd(q, k, v, t: Tiling):
    o, lse = _forward(q, k, v, t)
    return o, (q, k, v, o, lse)


def _flash_bwd(t: Tiling, residuals, do):
    q, k, v, o, lse = residuals
    b, l, _ = o.shape
    prod = (do.astype(jnp.float32) * o.astype(jnp.float32))[..., :t.heads * t.head_dim]
    prod = prod.reshape(b, l, t.heads, t.head_dim)
    return _backward(q, k, v, do, lse, jnp.sum(prod, axis=-1), t)


flash_lanes.defvjp(_flash_fwd, _flash_bwd)

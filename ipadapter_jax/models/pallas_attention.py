"""Flash attention for TPU as Pallas (Mosaic) kernels: a forward kernel and a backward kernel, tied together by
`jax.custom_vjp`. The backward is one kernel (key blocks outer, query blocks inner) that accumulates dK/dV per key
block and dQ for the row's whole query length on chip, recomputing the scores once: 10 LSD matrix FLOPs where the
classic two-kernel split (dK/dV, then dQ; `fused_backward=False`) issues 14, estimated ~20% faster on v5p.
With `store_probs` (rows layout, at most `STORED_PROBS_MAX_KEYS` keys) the forward under differentiation takes a
whole key row per block, computes the exact softmax and writes P; the same backward kernel then reads P instead
of recomputing it: 8 LSD and no exp, for P's bytes written once and read once (2 GiB per SD1.5 64x64 layer at 8
images per chip). Chosen for v5p training (`models/target.py`), where the compiler estimates the whole SD1.5 step
5% faster (62.6 against 65.6 ms at 8 per chip).

Layout: rows (B*H, L, D). Query and key lengths are padded to whole blocks (padded keys are masked, padded
queries are sliced off); the head width is padded with zeros to the 128-lane width (`pad_head=True`, SD1.5's
40 -> 128, SDXL's 64 -> 128) or kept as the block's full last dimension, which Mosaic pads in registers
(`pad_head=False`): the MXU does the same work either way, the second moves fewer bytes through HBM and needs
no pad of q, k and v before the kernels. Chosen by the compiler's estimates: narrow on every TPU. Per call
(bench/tpu_kernel_results.json) narrow beats padded at every SD1.5 and SDXL shape on v5p, and on v5e and v6e too
once the `ConcatBitcast` joins that their cost model prices at -1 s are counted at 0 s (planning/ops.py; read
before that, v5e and v6e had looked unpriceable for narrow kernels); the whole SDXL generation step on v5e
(1024², 2 per chip) is estimated at 242.4 ms with narrow heads against 256.5 ms padded, whose pads took 13% of
it. `lanes=True` keeps the heads in the lanes instead, (B, L, H*D) as the projections write them
(models/pallas_lanes.py): no transposes around the kernels. The compiler estimates it faster per call than narrow
rows on every TPU. Compiled whole, lanes win on v5e and v6e (SDXL generation at 1024², 2 per chip: v5e 226.4
against 242.7 ms, v6e 69.4 against 81.2 ms; SD1.5 training on v5e-256 33.8 against 35.1 ms) and lose on v5p
(SD1.5 training at 8 per chip 76.9 against 65.6 ms, SDXL generation 113.4 against 107.0 ms): there the XLA
operations around the kernels get slower by more than the transposes they save (perhaps because the lanes
kernels ask for 32 MiB or more of scoped VMEM: a 48 MiB request by the stored-probabilities forward made every
XLA operation of the SD1.5 step slower, `_PROBS_BLOCK_Q`; not verified for lanes). The caller says which
(`AttentionPolicy.lanes`, from the chip the program is compiled for: `models/target.py`). `tokens=True` (v5p)
hands every call whose keys fit one block to the tokens-in-lanes kernels (models/pallas_tokens.py): (B*H, D, L),
the layout XLA already keeps the projections in, so nothing is transposed around them.
Per-row statistics (log-sum-exp, and the backward's rowsum(dO * O)) are stored 128 lanes wide, the TPU's tile.

Every kernel declares its cost (`pl.CostEstimate`): the TPU compiler cannot see inside a Mosaic kernel and would
count it as free. FLOPs are the matrix-unit work actually issued (head width rounded up to 128 lanes, padded
rows and keys included); bytes are those the kernel's block pipeline reads and writes in HBM, counting every
re-read of a block whose index changes between grid steps. The same numbers are returned by `kernel_costs`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
KERNEL_NAMES = ("ipadapter_flash_fwd", "ipadapter_flash_dkv", "ipadapter_flash_dq", "ipadapter_flash_bwd",
                "ipadapter_probs_fwd", "ipadapter_probs_bwd")
# Stored probabilities (`store_probs`): the training forward keeps the whole softmax for the backward when the key
# length is at most this (SD1.5's and SDXL's 64x64 latents at 512² and 1024²); a longer row would not fit one
# kernel block, and its HBM copy grows with L x S.
STORED_PROBS_MAX_KEYS = 4096
# Query rows per forward block when a whole key row is one block (4 MiB of float32 scores at 4096 keys). It fits
# the compiler's default scoped VMEM, which the kernels keep: asking for more (48 MiB) leaves XLA's own operations
# less on-chip memory in the whole program, and the compiler then estimates the SD1.5 training step on v5p 18%
# slower (73.6 against 62.6 ms at 8 images per chip, bench/tpu_notes.md).
_PROBS_BLOCK_Q = 256
_MASKED = -1e30  # logits of padded keys: exp() underflows to exactly 0
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static shape facts of one call: padded sizes, blocks, and the real key count (for masking)."""

    rows: int  # B * H
    q_len: int  # padded
    kv_len: int  # padded
    kv_real: int
    head_dim: int  # as stored (padded or not)
    block_q: int
    block_k: int
    itemsize: int
    interpret: bool = False
    q_real: int = 0  # unpadded query length and head width (0: as padded), for the useful-FLOP count
    head_real: int = 0
    fused_backward: bool = False  # one backward kernel, dQ on chip for the whole query length (lanes, stored P: always)
    heads: int = 1  # H: rows = B * H
    lanes: bool = False  # heads left in the lanes, (B, L, H*D) (models/pallas_lanes.py); else rows (B*H, L, D)
    width: int = 0  # lanes layout: the operands' last dimension, H*D or H*D padded to whole 128-lane tiles
    store_probs: bool = False  # rows layout: the forward under differentiation stores P for the backward
    # tokens layout: where the keys start a new softmax (besides 0): concatenated key sets that each take their
    # own softmax, as the decoupled cross-attention's text and image tokens (models/pallas_tokens.py)
    segments: tuple[int, ...] = ()

    @property
    def probs_block_q(self) -> int:
        """Query rows per stored-probabilities forward block: 256, or 128 where the padded length is an odd
        multiple of 128 (a 384-row block for 257-384 queries)."""
        return math.gcd(self.q_len, _PROBS_BLOCK_Q)

    @property
    def channels(self) -> int:
        return self.width or self.heads * self.head_dim

    @property
    def mxu_dim(self) -> int:
        return _round_up(self.head_dim, LANES)


def _stat_bytes(t: Tiling) -> int:
    return t.rows * t.q_len * LANES * 4


def kernel_costs(t: Tiling) -> dict[str, pl.CostEstimate]:
    """The declared cost of each kernel for one call (see the module note)."""
    lsd = t.rows * t.q_len * t.kv_len * t.mxu_dim
    exps = t.rows * t.q_len * t.kv_len
    q_bytes = t.rows * t.q_len * t.head_dim * t.itemsize  # also o, do, dq
    k_bytes = t.rows * t.kv_len * t.head_dim * t.itemsize  # also v, dk, dv
    n_q, n_k = t.q_len // t.block_q, t.kv_len // t.block_k
    stats = _stat_bytes(t)
    probs = t.rows * t.q_len * t.kv_len * t.itemsize
    return {
        # s = q k^T and p v; k, v re-read for every query block; o and the log-sum-exp written once.
        "ipadapter_flash_fwd": pl.CostEstimate(
            flops=4 * lsd, transcendentals=exps + t.rows * t.q_len * n_k * LANES,
            bytes_accessed=2 * q_bytes + stats + n_q * 2 * k_bytes),
        # s, dp recomputed; dv += p^T do, dk += ds^T q; q, do and both statistics re-read per key block.
        "ipadapter_flash_dkv": pl.CostEstimate(
            flops=8 * lsd, transcendentals=exps,
            bytes_accessed=4 * k_bytes + n_k * (2 * q_bytes + 2 * stats)),
        # s, dp recomputed; dq += ds k; k and v re-read per query block.
        "ipadapter_flash_dq": pl.CostEstimate(
            flops=6 * lsd, transcendentals=exps,
            bytes_accessed=3 * q_bytes + 2 * stats + n_q * 2 * k_bytes),
        # Fused: s recomputed once; dv, dp, dk and dq; k, v read and dk, dv, dq written once; q, do and both
        # statistics re-read per key block.
        "ipadapter_flash_bwd": pl.CostEstimate(
            flops=10 * lsd, transcendentals=exps,
            bytes_accessed=4 * k_bytes + q_bytes + n_k * (2 * q_bytes + 2 * stats)),
        # Stored probabilities: the forward takes a whole key row per block (exact softmax, k and v read once per
        # row) and writes P; the backward reads P instead of recomputing q k^T and exp: dv, dp, dk and dq.
        "ipadapter_probs_fwd": pl.CostEstimate(
            flops=4 * lsd, transcendentals=exps, bytes_accessed=2 * q_bytes + 2 * k_bytes + probs),
        "ipadapter_probs_bwd": pl.CostEstimate(
            flops=8 * lsd, transcendentals=0,
            bytes_accessed=4 * k_bytes + q_bytes + n_k * (2 * q_bytes + stats) + probs),
    }


def useful_flops(t: Tiling) -> dict[str, int]:
    """FLOPs of the attention math at its real sizes, as XLA counts its own path: 4LSD forward, 8LSD backward
    (dV, dP, dK in the dK/dV kernel; dQ in the dQ kernel). The kernels' recomputation is not counted."""
    lsd = t.rows * (t.q_real or t.q_len) * t.kv_real * (t.head_real or t.head_dim)
    return {KERNEL_NAMES[0]: 4 * lsd, KERNEL_NAMES[1]: 6 * lsd, KERNEL_NAMES[2]: 2 * lsd, KERNEL_NAMES[3]: 8 * lsd,
            KERNEL_NAMES[4]: 4 * lsd, KERNEL_NAMES[5]: 8 * lsd}


def _meta(t: Tiling, name: str) -> dict[str, str]:
    # Read back from the compiled HLO by the planner (planning/report.py): model FLOPs, and the heads' layout
    # (these are the rows kernels; models/pallas_lanes.py records "lanes" for its own).
    return {"useful_flops": str(useful_flops(t)[name]), "layout": "rows"}


def mask_padded_keys(s, kv_block, t: Tiling):
    """Logits (queries, keys of block `kv_block`) with the keys past the real length set to `_MASKED`."""
    if t.kv_real != t.kv_len:
        cols = kv_block * t.block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(cols < t.kv_real, s, _MASKED)
    return s


def _masked_logits(q, k, kv_block, t: Tiling):
    return mask_padded_keys(lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32), kv_block, t)


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, t: Tiling):
    kv = pl.program_id(2)

    @pl.when(kv == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    v = v_ref[0]
    s = _masked_logits(q_ref[0], k_ref[0], kv, t)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    p = jnp.exp(s - m_new[:, :1])
    alpha = jnp.exp(m_prev - m_new)
    l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
    acc_sc[...] = alpha[:, :1] * acc_sc[...] + lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    m_sc[...] = m_new

    @pl.when(kv == t.kv_len // t.block_k - 1)
    def _finish():
        total = l_sc[...]
        o_ref[0] = (acc_sc[...] / total[:, :1]).astype(o_ref.dtype)
        lse_ref[0] = m_sc[...] + jnp.log(total)


def _probs_and_ds(q, k, v, do, lse, delta, kv_block, t: Tiling):
    p = jnp.exp(_masked_logits(q, k, kv_block, t) - lse[:, :1])
    dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
    return p, p * (dp - delta[:, :1])


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, t: Tiling):
    qb = pl.program_id(2)

    @pl.when(qb == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    q, do = q_ref[0], do_ref[0]
    p, ds = _probs_and_ds(q, k_ref[0], v_ref[0], do, lse_ref[0], delta_ref[0], pl.program_id(1), t)
    dv_sc[...] += lax.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dk_sc[...] += lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

    @pl.when(qb == t.q_len // t.block_q - 1)
    def _finish():
        dk_ref[0] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[0] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc, *, t: Tiling):
    kv = pl.program_id(2)

    @pl.when(kv == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    k = k_ref[0]
    _, ds = _probs_and_ds(q_ref[0], k, v_ref[0], do_ref[0], lse_ref[0], delta_ref[0], kv, t)
    dq_sc[...] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(kv == t.kv_len // t.block_k - 1)
    def _finish():
        dq_ref[0] = dq_sc[...].astype(dq_ref.dtype)


def _bwd_kernel(q_ref, k_ref, v_ref, do_ref, saved_ref, delta_ref, dq_ref, dk_ref, dv_ref, dq_sc, dk_sc, dv_sc, *,
                t: Tiling):
    """Grid (rows, key blocks, query blocks): dK/dV accumulate over the inner query blocks, dQ over the key
    blocks in a scratch that holds the row's whole query length, written out after the last key block. `saved_ref`
    holds the log-sum-exp to recompute P from, or (`store_probs`) P's block itself."""
    kv, qb = pl.program_id(1), pl.program_id(2)
    rows = pl.ds(pl.multiple_of(qb * t.block_q, t.block_q), t.block_q)

    @pl.when((kv == 0) & (qb == 0))
    def _init_dq():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(qb == 0)
    def _init_dkv():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    q, k, do = q_ref[0], k_ref[0], do_ref[0]
    if t.store_probs:
        p = saved_ref[0]
        dp = lax.dot_general(do, v_ref[0], _NT, preferred_element_type=jnp.float32)
        ds = p.astype(jnp.float32) * (dp - delta_ref[0][:, :1])
    else:
        p, ds = _probs_and_ds(q, k, v_ref[0], do, saved_ref[0], delta_ref[0], kv, t)
    dv_sc[...] += lax.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dk_sc[...] += lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)
    dq_sc[rows, :] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(qb == t.q_len // t.block_q - 1)
    def _finish_dkv():
        dk_ref[0] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[0] = dv_sc[...].astype(dv_ref.dtype)

    @pl.when(kv == t.kv_len // t.block_k - 1)
    def _finish_dq():
        dq_ref[0, rows, :] = dq_sc[rows, :].astype(dq_ref.dtype)


def _fwd_probs_kernel(q_ref, k_ref, v_ref, o_ref, p_ref, *, t: Tiling):
    """One block of query rows against the whole key row: the exact softmax, written out for the backward."""
    v = v_ref[0]
    s = _masked_logits(q_ref[0], k_ref[0], 0, t)
    p = jnp.exp(s - s.max(axis=1, keepdims=True))
    p = p / p.sum(axis=1, keepdims=True)
    p_ref[0] = p.astype(p_ref.dtype)
    o_ref[0] = lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(o_ref.dtype)


def _forward_probs(q, k, v, t: Tiling):
    bq = t.probs_block_q
    q_blocks = pl.BlockSpec((1, bq, t.head_dim), lambda r, i: (r, i, 0))
    whole_keys = pl.BlockSpec((1, t.kv_len, t.head_dim), lambda r, i: (r, 0, 0))
    params = None if t.interpret else pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
    return pl.pallas_call(
        functools.partial(_fwd_probs_kernel, t=t), grid=(t.rows, t.q_len // bq),
        in_specs=[q_blocks, whole_keys, whole_keys],
        out_specs=[q_blocks, pl.BlockSpec((1, bq, t.kv_len), lambda r, i: (r, i, 0))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((t.rows, t.q_len, t.kv_len), q.dtype)],
        compiler_params=params, interpret=t.interpret, name=KERNEL_NAMES[4], metadata=_meta(t, KERNEL_NAMES[4]),
        cost_estimate=kernel_costs(t)[KERNEL_NAMES[4]])(q, k, v)


def _backward_fused(q, k, v, do, saved, delta, t: Tiling):
    """The one-kernel backward; `saved` is the log-sum-exp, or P when the forward stored it (`t.store_probs`)."""
    f32 = jnp.float32
    whole = pl.BlockSpec((1, t.q_len, t.head_dim), lambda r, i, j: (r, 0, 0))
    saved_spec = (pl.BlockSpec((1, t.block_q, t.block_k), lambda r, i, j: (r, j, i)) if t.store_probs
                  else _q_spec(t, 2, LANES))
    name = KERNEL_NAMES[5] if t.store_probs else KERNEL_NAMES[3]
    params = None if t.interpret else pltpu.CompilerParams(
        dimension_semantics=("parallel", "arbitrary", "arbitrary"))
    return pl.pallas_call(
        functools.partial(_bwd_kernel, t=t), grid=(t.rows, t.kv_len // t.block_k, t.q_len // t.block_q),
        in_specs=[_q_spec(t, 2, t.head_dim), _k_spec(t, 1), _k_spec(t, 1), _q_spec(t, 2, t.head_dim), saved_spec,
                  _q_spec(t, 2, LANES)],
        out_specs=[whole, _k_spec(t, 1), _k_spec(t, 1)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((t.q_len, t.head_dim), f32), pltpu.VMEM((t.block_k, t.head_dim), f32),
                        pltpu.VMEM((t.block_k, t.head_dim), f32)],
        compiler_params=params, interpret=t.interpret, name=name, metadata=_meta(t, name),
        cost_estimate=kernel_costs(t)[name])(q, k, v, do, saved, delta)


def _params(t: Tiling):
    return None if t.interpret else pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _q_spec(t: Tiling, q_axis: int, width: int):
    """Blocks of a (rows, q_len, width) array indexed by the grid axis `q_axis` (1: outer, 2: inner)."""
    return pl.BlockSpec((1, t.block_q, width), lambda r, i, j: (r, (i, j)[q_axis - 1], 0))


def _k_spec(t: Tiling, k_axis: int):
    return pl.BlockSpec((1, t.block_k, t.head_dim), lambda r, i, j: (r, (i, j)[k_axis - 1], 0))


def _forward(q, k, v, t: Tiling):
    f32 = jnp.float32
    grid = (t.rows, t.q_len // t.block_q, t.kv_len // t.block_k)
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, t=t), grid=grid,
        in_specs=[_q_spec(t, 1, t.head_dim), _k_spec(t, 2), _k_spec(t, 2)],
        out_specs=[_q_spec(t, 1, t.head_dim), _q_spec(t, 1, LANES)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((t.rows, t.q_len, LANES), f32)],
        scratch_shapes=[pltpu.VMEM((t.block_q, LANES), f32), pltpu.VMEM((t.block_q, LANES), f32),
                        pltpu.VMEM((t.block_q, t.head_dim), f32)],
        compiler_params=_params(t), interpret=t.interpret, name=KERNEL_NAMES[0], metadata=_meta(t, KERNEL_NAMES[0]),
        cost_estimate=kernel_costs(t)[KERNEL_NAMES[0]])(q, k, v)
    return o, lse


def _backward(q, k, v, do, lse, delta, t: Tiling):
    f32 = jnp.float32
    costs = kernel_costs(t)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, t=t), grid=(t.rows, t.kv_len // t.block_k, t.q_len // t.block_q),
        in_specs=[_q_spec(t, 2, t.head_dim), _k_spec(t, 1), _k_spec(t, 1), _q_spec(t, 2, t.head_dim),
                  _q_spec(t, 2, LANES), _q_spec(t, 2, LANES)],
        out_specs=[_k_spec(t, 1), _k_spec(t, 1)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((t.block_k, t.head_dim), f32), pltpu.VMEM((t.block_k, t.head_dim), f32)],
        compiler_params=_params(t), interpret=t.interpret, name=KERNEL_NAMES[1], metadata=_meta(t, KERNEL_NAMES[1]),
        cost_estimate=costs[KERNEL_NAMES[1]])(q, k, v, do, lse, delta)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, t=t), grid=(t.rows, t.q_len // t.block_q, t.kv_len // t.block_k),
        in_specs=[_q_spec(t, 1, t.head_dim), _k_spec(t, 2), _k_spec(t, 2), _q_spec(t, 1, t.head_dim),
                  _q_spec(t, 1, LANES), _q_spec(t, 1, LANES)],
        out_specs=_q_spec(t, 1, t.head_dim),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((t.block_q, t.head_dim), f32)],
        compiler_params=_params(t), interpret=t.interpret, name=KERNEL_NAMES[2], metadata=_meta(t, KERNEL_NAMES[2]),
        cost_estimate=costs[KERNEL_NAMES[2]])(q, k, v, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q, k, v, t: Tiling):
    return _forward(q, k, v, t)[0]


def _flash_fwd(q, k, v, t: Tiling):
    o, saved = (_forward_probs if t.store_probs else _forward)(q, k, v, t)  # P, or the log-sum-exp
    return o, (q, k, v, o, saved)


def _flash_bwd(t: Tiling, residuals, do):
    q, k, v, o, saved = residuals
    delta = jnp.broadcast_to(jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True),
                             (t.rows, t.q_len, LANES))
    return (_backward_fused if t.fused_backward else _backward)(q, k, v, do, saved, delta, t)


_flash.defvjp(_flash_fwd, _flash_bwd)


def tiling(q_shape, k_shape, dtype, *, block_q: int = 512, block_k: int = 512, pad_head: bool = True,
           fused_backward: bool = True, lanes: bool = False, pad_lanes: bool = False, store_probs: bool = False,
           interpret: bool = False) -> Tiling:
    """The tiling of a call on queries (B, L, H, D) and keys (B, S, H, D). `store_probs` is honoured for the rows
    layout with at most `STORED_PROBS_MAX_KEYS` keys; other calls recompute P in the backward."""
    b, l, h, d = q_shape
    s = k_shape[1]
    bq = min(block_q, _round_up(l, LANES))
    bk = min(block_k, _round_up(s, LANES))
    store_probs = store_probs and not lanes and _round_up(s, bk) <= STORED_PROBS_MAX_KEYS
    return Tiling(rows=b * h, q_len=_round_up(l, bq), kv_len=_round_up(s, bk), kv_real=s,
                  head_dim=_round_up(d, LANES) if pad_head and not lanes else d, block_q=bq, block_k=bk,
                  itemsize=jnp.dtype(dtype).itemsize, interpret=interpret, q_real=l, head_real=d,
                  fused_backward=fused_backward or lanes or store_probs, heads=h, lanes=lanes,
                  width=_round_up(h * d, LANES) if lanes and pad_lanes else 0, store_probs=store_probs)


def flash_attention(q_BLHD, k_BSHD, v_BSHD, *, block_q: int = 512, block_k: int = 512, pad_head: bool = True,
                    fused_backward: bool = True, lanes: bool = False, pad_lanes: bool = False,
                    store_probs: bool = False, tokens: bool = False, segments: tuple[int, ...] = (),
                    interpret: bool = False):
    """softmax(q k^T / sqrt(d)) v with the Pallas kernels; the same numbers as the XLA path to rounding.

    q is scaled in its own dtype before the kernels, as the XLA path does; `interpret=True` runs the kernels
    in Pallas' interpreter (any backend, for tests). `tokens` takes the tokens-in-lanes kernels
    (models/pallas_tokens.py) where the keys fit one block (`STORED_PROBS_MAX_KEYS`), the other layout otherwise;
    only they take `segments` (key sets with a softmax each, `Tiling.segments`)."""
    b, l, h, d = q_BLHD.shape
    if tokens and _round_up(k_BSHD.shape[1], LANES) <= STORED_PROBS_MAX_KEYS:
        from ipadapter_jax.models.pallas_tokens import tokens_attention

        return tokens_attention(q_BLHD, k_BSHD, v_BSHD, segments=segments, interpret=interpret)
    if segments:
        raise ValueError(f"key segments need the tokens layout and at most {STORED_PROBS_MAX_KEYS} keys; "
                         f"got {k_BSHD.shape[1]} keys with tokens={tokens}")
    t = tiling(q_BLHD.shape, k_BSHD.shape, q_BLHD.dtype, block_q=block_q, block_k=block_k, pad_head=pad_head,
               fused_backward=fused_backward, lanes=lanes, pad_lanes=pad_lanes, store_probs=store_probs,
               interpret=interpret)
    scale = jnp.asarray(d**-0.5, q_BLHD.dtype)
    if lanes:
        from ipadapter_jax.models.pallas_lanes import flash_lanes

        def flat(x_BXHD, length):  # (B, X, H, D) -> (B, length, width): a reshape of the projection's output
            x = x_BXHD.reshape(b, x_BXHD.shape[1], h * d)
            return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, t.channels - h * d)))

        out = flash_lanes(flat(q_BLHD * scale, t.q_len), flat(k_BSHD, t.kv_len), flat(v_BSHD, t.kv_len), t)
        return out[:, :l, :h * d].reshape(b, l, h, d)

    def rows(x_BXHD, length):
        x = jnp.transpose(x_BXHD, (0, 2, 1, 3)).reshape(b * h, x_BXHD.shape[1], d)
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, t.head_dim - d)))

    out = _flash(rows(q_BLHD * scale, t.q_len), rows(k_BSHD, t.kv_len), rows(v_BSHD, t.kv_len), t)
    return jnp.transpose(out[:, :l, :d].reshape(b, h, l, d), (0, 2, 1, 3))


def traced_mesh_axes():
    """(mesh, its axes not already manual, how many devices they span) of the mesh the program is traced under; an
    empty mesh (no context) spans one device."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else tuple(
        a for a, kind in zip(mesh.axis_names, mesh.axis_types, strict=True) if kind != jax.sharding.AxisType.Manual)
    return mesh, axes, math.prod(mesh.shape[a] for a in axes)


def sharded_flash_attention(q_BLHD, k_BSHD, v_BSHD, **kwargs):
    """`flash_attention` split over the mesh the program is traced under (`jax.set_mesh`), or None when the
    batch and the heads both fail to divide over it (the caller then takes the XLA path).

    A Mosaic kernel cannot be partitioned by the compiler, so it runs under `shard_map`, each device on its
    share of the batch (or, when the batch does not divide, of the heads). The mesh is the one jax's sharding
    context carries while tracing: a property of the compilation, like `in_shardings`, not of the model, so one
    model compiles for any mesh, and a call deep in the UNet needs no mesh argument threaded to it. Without a
    context mesh the program is taken to run on one device.
    """
    mesh, axes, size = traced_mesh_axes()
    kwargs.setdefault("pad_head", False)  # narrow rows unless the caller asks for lanes (see above)
    if size == 1:
        return flash_attention(q_BLHD, k_BSHD, v_BSHD, **kwargs)
    batch, heads = q_BLHD.shape[0], q_BLHD.shape[2]
    if batch % size == 0:
        spec = jax.sharding.PartitionSpec(axes, None, None, None)
    elif heads % size == 0:
        spec = jax.sharding.PartitionSpec(None, None, axes, None)
    else:
        return None
    if jax.sharding.AxisType.Explicit in mesh.axis_types:  # sharding in types: inputs must carry the split
        q_BLHD, k_BSHD, v_BSHD = (jax.sharding.reshard(x, spec) for x in (q_BLHD, k_BSHD, v_BSHD))
    body = functools.partial(flash_attention, **kwargs)
    return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, axis_names=set(axes),
                         check_vma=False)(q_BLHD, k_BSHD, v_BSHD)

"""The Pallas flash-attention kernels (run by Pallas' interpreter on CPU) compute the XLA path's attention and
its gradients, and declare the cost of the work they really issue.

Bounds: float32 throughout, so both sides round every product and sum at float32's 2^-24 ~ 6e-8; the kernels
reorder the softmax sums (online max, per block) and the backward recomputes probabilities from the saved
log-sum-exp (or reads them stored, in float32 here), so results differ by rounding accumulated over a few hundred
terms: relative errors of ~1e-7 to 1e-6 (measured 1e-8 to 4e-7), bounded at 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_models import rel_err

from ipadapter_jax.models import pallas_attention as pa
from ipadapter_jax.models.attention import _plain


def _qkv(b, l, s, h, d, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape).astype(np.float32))
                 for shape in ((b, l, h, d), (b, s, h, d), (b, s, h, d)))


def _loss(fn):
    # sin() makes the cotangent differ per element, so every gradient entry is exercised.
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))


CASES = {
    "self, no padding": (1, 256, 256, 2, 128, True),  # whole blocks, head width already 128 lanes
    "self, padded rows and SD1.5 heads": (1, 320, 320, 2, 40, True),  # rows 320 -> 384, width 40 -> 128
    "self, SD1.5 heads kept 40 wide": (1, 256, 256, 2, 40, False),
    "cross, 77 text tokens": (2, 256, 77, 2, 40, True),  # keys padded 77 -> 128 and masked
    "cross, 4 IP tokens (SDXL width)": (2, 256, 4, 2, 64, True),
    "cross, 16 IP tokens (Plus)": (1, 128, 16, 2, 64, False),
}


@pytest.mark.parametrize(("case", "fused"), [(c, True) for c in CASES] + [
    ("self, padded rows and SD1.5 heads", False), ("cross, 77 text tokens", False)])  # the two-kernel backward
def test_kernels_match_xla_forward_and_gradients(case, fused):
    b, l, s, h, d, pad_head = CASES[case]
    q, k, v = _qkv(b, l, s, h, d)

    def flash(q, k, v):
        return pa.flash_attention(q, k, v, block_q=128, block_k=128, pad_head=pad_head, fused_backward=fused,
                                  interpret=True)

    assert rel_err(jax.jit(flash)(q, k, v), _plain(q, k, v)) < 1e-5
    ours = jax.jit(jax.grad(_loss(flash), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.jit(jax.grad(_loss(_plain), argnums=(0, 1, 2)))(q, k, v)
    for name, a, r in zip(("dq", "dk", "dv"), ours, ref, strict=True):
        assert rel_err(a, r) < 1e-5, name


@pytest.mark.parametrize(("case", "block"), [
    ("self, padded rows and SD1.5 heads", 128), ("self, SD1.5 heads kept 40 wide", 128),
    ("cross, 77 text tokens", 128), ("cross, 16 IP tokens (Plus)", 128),
    ("self, padded rows and SD1.5 heads", 512)])  # default blocks: 320 queries in one 384-row block
def test_stored_probabilities_match_xla_forward_and_gradients(case, block, monkeypatch):
    """`store_probs`: the forward under differentiation writes the exact softmax (a whole key row per block) and
    the backward reads it: the XLA path's attention and gradients; padded keys hold exactly zero probability."""
    b, l, s, h, d, pad_head = CASES[case]
    q, k, v = _qkv(b, l, s, h, d, seed=2)
    stored = []
    forward_probs = pa._forward_probs

    def spy(q, k, v, t):
        o, probs = forward_probs(q, k, v, t)
        stored.append(probs)
        return o, probs

    monkeypatch.setattr(pa, "_forward_probs", spy)

    def flash(q, k, v):
        return pa.flash_attention(q, k, v, block_q=block, block_k=block, pad_head=pad_head, store_probs=True,
                                  interpret=True)

    assert rel_err(jax.jit(flash)(q, k, v), _plain(q, k, v)) < 1e-5
    assert not stored  # a forward alone writes no probabilities
    ours = jax.grad(_loss(flash), argnums=(0, 1, 2))(q, k, v)
    ref = jax.jit(jax.grad(_loss(_plain), argnums=(0, 1, 2)))(q, k, v)
    for name, a, r in zip(("dq", "dk", "dv"), ours, ref, strict=True):
        assert rel_err(a, r) < 1e-5, name
    (probs,) = stored
    t = pa.tiling(q.shape, k.shape, q.dtype, block_q=block, block_k=block, store_probs=True)
    assert probs.shape == (b * h, t.q_len, t.kv_len)
    np.testing.assert_allclose(np.sum(probs[:, :l], axis=-1), 1.0, rtol=1e-5)
    assert not np.any(probs[:, :, s:])


@pytest.mark.parametrize("layout", [dict(block_q=128, block_k=128, pad_head=False, store_probs=True),
                                    dict(tokens=True)], ids=["rows", "tokens"])
def test_stored_probabilities_in_bfloat16_lose_no_more_than_the_xla_path(layout):
    """In bfloat16 the stored P is rounded to 8 bits before the backward reads it; the recomputing kernels round
    their float32 P to bfloat16 for the same products. Against the float32 gradients, the stored-probabilities
    gradients are as accurate as the XLA path's own bfloat16 gradients (measured: within 5% of its error), in the
    rows layout and with the tokens in the lanes (models/pallas_tokens.py, which also takes rowsum(dO * O) as
    rowsum(P * dP) from the stored P)."""
    q, k, v = _qkv(1, 512, 512, 2, 40, seed=3)
    truth = jax.grad(_loss(_plain), argnums=(0, 1, 2))(q, k, v)
    half = [x.astype(jnp.bfloat16) for x in (q, k, v)]

    def flash(q, k, v):
        return pa.flash_attention(q, k, v, **layout, interpret=True)

    def bf16_loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v).astype(jnp.float32)))

    ours = jax.grad(bf16_loss(flash), argnums=(0, 1, 2))(*half)
    xla = jax.grad(bf16_loss(_plain), argnums=(0, 1, 2))(*half)
    for name, a, x, t in zip(("dq", "dk", "dv"), ours, xla, truth, strict=True):
        ours_err, xla_err = rel_err(a.astype(jnp.float32), t), rel_err(x.astype(jnp.float32), t)
        assert ours_err < 1.5 * xla_err, (name, ours_err, xla_err)


def test_stored_probabilities_only_where_a_key_row_fits_one_block():
    sd15 = pa.tiling((2, 4096, 8, 40), (2, 4096, 8, 40), jnp.bfloat16, pad_head=False, store_probs=True)
    assert sd15.store_probs and sd15.probs_block_q == 256
    short = pa.tiling((1, 320, 2, 40), (1, 320, 2, 40), jnp.float32, store_probs=True)  # one 384-row block
    assert (short.q_len, short.probs_block_q) == (384, 128)
    longer = pa.tiling((1, 9216, 8, 40), (1, 9216, 8, 40), jnp.bfloat16, store_probs=True)  # 96x96 latents
    lanes = pa.tiling((2, 4096, 8, 40), (2, 4096, 8, 40), jnp.bfloat16, lanes=True, store_probs=True)
    assert not longer.store_probs and not lanes.store_probs  # these recompute P in the backward
    lsd = 16 * 4096 * 4096 * 128
    costs = pa.kernel_costs(sd15)
    assert costs["ipadapter_probs_fwd"].flops == 4 * lsd
    assert costs["ipadapter_probs_bwd"].flops == 8 * lsd  # dv, dp, dk, dq: no recomputed q k^T
    assert costs["ipadapter_probs_bwd"].transcendentals == 0
    probs = 16 * 4096 * 4096 * 2  # P in bf16, written once and read once
    q = 16 * 4096 * 40 * 2  # q (and o, k, v, do, ...) in bf16, heads kept 40 wide
    delta = 16 * 4096 * 128 * 4  # rowsum(dO * O), 128 lanes of float32
    # forward: q read and o written, k and v read once per row (a whole key row per block), P written
    assert costs["ipadapter_probs_fwd"].bytes_accessed == 2 * q + 2 * q + probs
    # backward: k, v read and dk, dv, dq written once; q, do and delta re-read for each of the 8 key blocks; P read
    assert costs["ipadapter_probs_bwd"].bytes_accessed == 4 * q + q + 8 * (2 * q + delta) + probs


@pytest.mark.parametrize("lanes", [False, True], ids=["rows", "lanes"])
def test_sharded_over_a_mesh_matches_xla(lanes):
    """Under `jax.set_mesh` the kernels run in shard_map, split by batch (or heads when the batch does not
    divide): the same numbers as the unsplit XLA path, with the heads as rows or in the lanes."""
    auto = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))  # as sharding.py
    explicit = jax.make_mesh((4, 2), ("data", "fsdp"), devices=jax.devices()[:8],
                             axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    for mesh, (b, h) in ((auto, (8, 2)), (auto, (2, 8)), (explicit, (8, 2))):  # split by batch, or by heads
        q, k, v = _qkv(b, 128, 128, h, 64, seed=b)
        flash = jax.jit(lambda q, k, v: pa.sharded_flash_attention(q, k, v, block_q=128, block_k=128,
                                                                   lanes=lanes, interpret=True))
        with jax.set_mesh(mesh):
            text = flash.lower(q, k, v).as_text()
            out = flash(q, k, v)
        assert "shard_map" in text or "manual" in text.lower()
        assert rel_err(out, _plain(q, k, v)) < 1e-5
    with jax.set_mesh(auto):  # neither divides: the caller's XLA path
        assert pa.sharded_flash_attention(*_qkv(3, 128, 128, 3, 64), interpret=True) is None


def test_declared_costs_count_the_issued_work():
    t = pa.tiling((2, 4096, 8, 40), (2, 4096, 8, 40), jnp.bfloat16)  # SD1.5 64x64 self-attention
    lsd = 16 * 4096 * 4096 * 128  # rows x L x S x head width as issued to the 128-lane matrix unit
    costs = pa.kernel_costs(t)
    assert costs["ipadapter_flash_fwd"].flops == 4 * lsd
    assert costs["ipadapter_flash_dkv"].flops == 8 * lsd
    assert costs["ipadapter_flash_dq"].flops == 6 * lsd
    assert costs["ipadapter_flash_bwd"].flops == 10 * lsd  # fused: s recomputed once, not twice
    # Bytes: at least every operand once (q, k, v, o in bf16 and the float32 log-sum-exp), plus the re-reads
    # of k and v for each of the 8 query blocks.
    qkvo = 4 * 16 * 4096 * 128 * 2
    assert costs["ipadapter_flash_fwd"].bytes_accessed == qkvo + 16 * 4096 * 128 * 4 + 7 * 2 * 16 * 4096 * 128 * 2
    narrow = pa.kernel_costs(pa.tiling((2, 4096, 8, 40), (2, 4096, 8, 40), jnp.bfloat16, pad_head=False))
    assert narrow["ipadapter_flash_fwd"].flops == costs["ipadapter_flash_fwd"].flops  # same matrix-unit work
    assert narrow["ipadapter_flash_fwd"].bytes_accessed < costs["ipadapter_flash_fwd"].bytes_accessed
    for name in pa.KERNEL_NAMES[:4]:  # the recomputing kernels (the stored-probabilities backward has no exp)
        assert costs[name].transcendentals >= 16 * 4096 * 4096  # one exp per score
    from ipadapter_jax.models.pallas_lanes import lane_costs

    lanes = lane_costs(pa.tiling((2, 4096, 8, 40), (2, 4096, 8, 40), jnp.bfloat16, lanes=True))
    assert lanes["ipadapter_flash_fwd"].flops == costs["ipadapter_flash_fwd"].flops  # heads still 128 in the MXU
    assert lanes["ipadapter_flash_bwd"].flops == costs["ipadapter_flash_bwd"].flops
    # The statistics: (B, L, H) in one lane tile, where rows store a 128-lane tile per head.
    assert lanes["ipadapter_flash_fwd"].bytes_accessed < narrow["ipadapter_flash_fwd"].bytes_accessed


LANE_CASES = {
    "SD1.5 heads, lanes 320 wide": (1, 256, 256, 8, 40, False),  # H*D = 320: not whole 128-lane tiles
    "SD1.5 heads, lanes padded to 384": (1, 320, 320, 8, 40, True),  # rows 320 -> 384 too
    "SDXL heads": (2, 256, 256, 2, 64, False),
    "cross, 77 text tokens": (1, 256, 77, 2, 40, False),  # keys padded 77 -> 128 and masked
}


@pytest.mark.parametrize("case", list(LANE_CASES))
def test_lanes_layout_matches_xla_forward_and_gradients(case):
    """Heads left in the lanes, (B, L, H*D): the same attention and gradients as the XLA path."""
    b, l, s, h, d, pad_lanes = LANE_CASES[case]
    q, k, v = _qkv(b, l, s, h, d, seed=1)

    def flash(q, k, v):
        return pa.flash_attention(q, k, v, block_q=128, block_k=128, lanes=True, pad_lanes=pad_lanes,
                                  interpret=True)

    assert rel_err(jax.jit(flash)(q, k, v), _plain(q, k, v)) < 1e-5
    ours = jax.jit(jax.grad(_loss(flash), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.jit(jax.grad(_loss(_plain), argnums=(0, 1, 2)))(q, k, v)
    for name, a, r in zip(("dq", "dk", "dv"), ours, ref, strict=True):
        assert rel_err(a, r) < 1e-5, name

"""The tokens-in-lanes attention kernels (models/pallas_tokens.py, run by Pallas' interpreter on CPU) compute the
XLA path's attention and its gradients, store P only under differentiation, and declare the work they issue
(bfloat16 accuracy: test_pallas_attention.py).

Bounds as in test_pallas_attention.py: float32 on both sides, the kernels reorder the softmax sums and take
rowsum(dO * O) as rowsum(P * dP), so results differ by rounding accumulated over a few hundred terms (measured
4e-8 to 4e-7), bounded at 1e-5.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from kernel_calls import kernel_calls
from reference_models import rel_err

from ipadapter_jax.models import pallas_attention as pa
from ipadapter_jax.models import pallas_tokens as pt
from ipadapter_jax.models.attention import Attention, _plain
from ipadapter_jax.models.attention_policy import AttentionPolicy
from ipadapter_jax.models.ip_conditioning import IPConditioning


def _qkv(b, l, s, h, d, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape).astype(np.float32))
                 for shape in ((b, l, h, d), (b, s, h, d), (b, s, h, d)))


def _loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))  # a different cotangent for every element


def _flash(q, k, v):
    return pa.flash_attention(q, k, v, tokens=True, interpret=True)


CASES = {
    "SD1.5 heads, two query blocks": (1, 256, 256, 2, 40),
    "padded rows (320 -> 384, three blocks)": (2, 320, 320, 2, 40),
    "cross, 77 text tokens (keys padded to 128, masked)": (2, 256, 77, 2, 40),
    "cross, 16 IP tokens, SDXL width": (1, 128, 16, 2, 64),
    "SD1.5 32x32 width": (1, 128, 200, 1, 80),
}


@pytest.mark.parametrize("case", CASES)
def test_tokens_layout_matches_xla_forward_and_gradients(case, monkeypatch):
    b, l, s, h, d = CASES[case]
    q, k, v = _qkv(b, l, s, h, d, seed=len(case))
    stored = []
    forward = pt._forward

    def spy(q, k, v, t, scale, store):
        out = forward(q, k, v, t, scale, store)
        stored.append(out[1])
        return out

    monkeypatch.setattr(pt, "_forward", spy)
    assert rel_err(jax.jit(_flash)(q, k, v), _plain(q, k, v)) < 1e-5
    assert stored == [None]  # a forward alone writes no probabilities
    stored.clear()
    ours = jax.grad(_loss(_flash), argnums=(0, 1, 2))(q, k, v)
    ref = jax.jit(jax.grad(_loss(_plain), argnums=(0, 1, 2)))(q, k, v)
    for name, a, r in zip(("dq", "dk", "dv"), ours, ref, strict=True):
        assert rel_err(a, r) < 1e-5, name
    (probs,) = stored
    t = pt.tiling(q.shape, k.shape, q.dtype)
    assert probs.shape == (b * h, t.q_len, t.kv_len)
    np.testing.assert_allclose(np.sum(probs[:, :l], axis=-1), 1.0, rtol=1e-5)
    assert not np.any(probs[:, :, s:])  # padded keys: exactly zero probability


def _kernel_layouts(fn, *shapes):
    jaxpr = jax.make_jaxpr(fn)(*(jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes)).jaxpr
    return {layout for _, layout in kernel_calls(jaxpr)}


def test_tokens_only_where_the_keys_fit_one_block():
    """Keys up to STORED_PROBS_MAX_KEYS take the tokens kernels; a longer key row (96x96 latents) takes the rows
    kernels, which stream key blocks."""
    def grad(q, k, v):
        return jax.grad(lambda q, k, v: jnp.sum(pa.flash_attention(q, k, v, tokens=True, pad_head=False,
                                                                    store_probs=True).astype(jnp.float32)),
                        (0, 1, 2))(q, k, v)

    sd15 = (2, 4096, 8, 40)
    assert _kernel_layouts(grad, sd15, sd15, sd15) == {"tokens"}
    longer = (1, 9216, 8, 40)
    assert _kernel_layouts(grad, longer, longer, longer) == {"rows"}


def test_declared_costs_count_the_issued_work():
    t = pt.tiling((2, 4096, 8, 40), (2, 4096, 8, 40), jnp.bfloat16)  # SD1.5 64x64 self-attention, bf16
    assert (t.block_q, t.block_k, t.head_dim) == (pt.BLOCK_Q, 4096, 40)
    costs = pt.token_costs(t)
    lsd = 16 * 4096 * 4096 * 128  # the 40-wide contraction and the 40 rows of v^T P^T still take 128 in the MXU
    q = 16 * 4096 * 40 * 2  # one of q, k, v, o, do, dq, dk, dv: 40 sublanes, no lane padding
    probs = 16 * 4096 * 4096 * 2
    assert costs["ipadapter_flash_fwd"].flops == costs["ipadapter_probs_fwd"].flops == 4 * lsd
    assert costs["ipadapter_probs_bwd"].flops == 8 * lsd and costs["ipadapter_probs_bwd"].transcendentals == 0
    assert costs["ipadapter_flash_fwd"].transcendentals == 16 * 4096 * 4096  # one exp per score
    # k and v are read once per row (their block does not move along the query blocks); no statistics in HBM
    assert costs["ipadapter_flash_fwd"].bytes_accessed == 4 * q
    assert costs["ipadapter_probs_fwd"].bytes_accessed == 4 * q + probs
    assert costs["ipadapter_probs_bwd"].bytes_accessed == 7 * q + probs
    rows = pa.kernel_costs(pa.tiling((2, 4096, 8, 40), (2, 4096, 8, 40), jnp.bfloat16, pad_head=False,
                                     store_probs=True))
    assert costs["ipadapter_probs_bwd"].bytes_accessed < rows["ipadapter_probs_bwd"].bytes_accessed


KEY_SETS = {
    "text and one adapter's 16 tokens, a scale per batch row": ((77, 16), (0.7, -1.3)),
    "text and two adapters (4 and 16 tokens)": ((77, 4, 16), (0.5, 2.0)),
}


@pytest.mark.parametrize("case", KEY_SETS)
def test_key_sets_take_a_softmax_each_and_add_up(case):
    """The decoupled cross-attention in one call: keys [text, image tokens...], values [text, scale * image
    values...], a softmax per key set; the sum of separate attentions, forward and every gradient (scale too)."""
    lengths, scales = KEY_SETS[case]
    b, l, h, d = 2, 256, 2, 40
    q, _, _ = _qkv(b, l, 1, h, d, seed=3)
    rng = np.random.default_rng(4)
    ks = [jnp.asarray(rng.standard_normal((b, n, h, d)).astype(np.float32)) for n in lengths]
    vs = [jnp.asarray(rng.standard_normal((b, n, h, d)).astype(np.float32)) for n in lengths]
    scale = jnp.asarray(scales, jnp.float32).reshape(b, 1, 1, 1)
    starts = tuple(int(x) for x in np.cumsum(lengths)[:-1])

    def joined(q, ks, vs, scale):
        values = [vs[0]] + [v * scale for v in vs[1:]]
        out = pa.flash_attention(q, jnp.concatenate(ks, 1), jnp.concatenate(values, 1), tokens=True,
                                 segments=starts, interpret=True)
        return jnp.sum(jnp.sin(out)), out

    def separate(q, ks, vs, scale):
        out = _plain(q, ks[0], vs[0]) + sum(scale * _plain(q, k, v) for k, v in zip(ks[1:], vs[1:], strict=True))
        return jnp.sum(jnp.sin(out)), out

    (_, ours), grads = jax.value_and_grad(joined, argnums=(0, 1, 2, 3), has_aux=True)(q, ks, vs, scale)
    (_, ref), ref_grads = jax.jit(jax.value_and_grad(separate, argnums=(0, 1, 2, 3), has_aux=True))(q, ks, vs, scale)
    assert rel_err(ours, ref) < 1e-5
    for name, a, r in zip(("dq", "dk", "dv", "dscale"), grads, ref_grads, strict=True):
        for i, (x, y) in enumerate(zip(jax.tree.leaves(a), jax.tree.leaves(r), strict=True)):
            assert rel_err(x, y) < 1e-5, (name, i)


def test_key_sets_must_start_inside_the_keys_in_order():
    q, k, v = _qkv(1, 128, 93, 1, 40)
    for bad in ((93,), (16, 16), (40, 20), (0,)):
        with pytest.raises(ValueError, match="key segments"):
            pa.flash_attention(q, k, v, tokens=True, segments=bad, interpret=True)
    with pytest.raises(ValueError, match="tokens layout"):
        pa.flash_attention(q, k, v, segments=(77,), interpret=True)


def test_the_v5p_cross_attention_joins_text_and_image_keys_in_one_call(monkeypatch):
    """`Attention` with the v5p policy (tokens layout) runs its text and image branches as one kernel call and
    gives the XLA path's output and gradients (adapter weights, scale and input alike); with a mask it keeps the
    separate XLA calls."""
    monkeypatch.setattr(pa, "sharded_flash_attention", functools.partial(pa.flash_attention, interpret=True))
    module = Attention(80, 2, 40, cross_attention_dim=32, num_ip_adapters=1, ip_layer=0, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(module)
    v5p = AttentionPolicy(platform="tpu", lanes=False, store_probs=True, tokens=True)
    joined_module = nnx.merge(graphdef, state)
    joined_module.attention_impl = v5p
    joined_graphdef, _ = nnx.split(joined_module)
    rng = np.random.default_rng(5)
    x, context, tokens = (jnp.asarray(rng.standard_normal(s).astype(np.float32))
                          for s in ((2, 1024, 80), (2, 77, 32), (2, 1, 16, 32)))
    scales = jnp.asarray([[0.8], [1.5]], jnp.float32)  # (B, n_layers): a scale per batch row

    def loss(graphdef, state, x, scales, masks=(None,)):
        ip = IPConditioning(tokens=(tokens,), scales=(scales,), masks=masks)
        return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x, context, ip=ip)))

    grads = jax.grad(functools.partial(loss, joined_graphdef), argnums=(0, 1, 2))(state, x, scales)
    ref = jax.jit(jax.grad(functools.partial(loss, graphdef), argnums=(0, 1, 2)))(state, x, scales)
    assert rel_err(loss(joined_graphdef, state, x, scales), loss(graphdef, state, x, scales)) < 1e-5
    for (path, a), (_, r) in zip(jax.tree_util.tree_leaves_with_path(grads),
                                 jax.tree_util.tree_leaves_with_path(ref), strict=True):
        assert rel_err(a, r) < 1e-5, jax.tree_util.keystr(path)
    calls = kernel_calls(jax.make_jaxpr(functools.partial(loss, joined_graphdef))(state, x, scales).jaxpr)
    assert calls == [(pa.KERNEL_NAMES[0], "tokens")]  # one forward for both branches
    mask = (jnp.ones((1, 8, 8), jnp.float32),)
    masked = jax.make_jaxpr(functools.partial(loss, joined_graphdef, masks=mask))(state, x, jnp.ones((1, 1)))
    assert kernel_calls(masked.jaxpr) == []

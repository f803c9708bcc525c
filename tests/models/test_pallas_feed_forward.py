"""The feed-forward branch's input-gradient kernel (models/pallas_feed_forward.py, run by Pallas' interpreter on
CPU) gives torch's gradients, on one device and split over a mesh, and only v5p targets take it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from jax.sharding import Mesh
from kernel_calls import kernel_calls

from ipadapter_jax.models import pallas_feed_forward as pff
from ipadapter_jax.models.attention_policy import AttentionPolicy
from ipadapter_jax.models.layers import norm_with_stats
from ipadapter_jax.models.target import set_target
from ipadapter_jax.models.transformer import BasicTransformerBlock

B, L, C, F = 2, 512, 32, 128  # two token blocks; F = 4 C (diffusers' FeedForward), one lane tile
EPS = 1e-5
NAMES = ("x", "norm scale", "norm bias", "w1", "b1", "w2", "b2")


def _rel(a, b) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _inputs():
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((B, L, C)) * 2 + 0.5).astype(np.float32),
            (1 + 0.1 * rng.standard_normal(C)).astype(np.float32), (0.1 * rng.standard_normal(C)).astype(np.float32),
            (rng.standard_normal((C, 2 * F)) * 0.5).astype(np.float32),  # gates from about -10 to 10: both tails
            rng.standard_normal(2 * F).astype(np.float32), (rng.standard_normal((F, C)) * 0.1).astype(np.float32),
            rng.standard_normal(C).astype(np.float32)], rng.standard_normal((B, L, C)).astype(np.float32)


def _torch(args, d_out):
    """diffusers' BasicTransformerBlock feed-forward branch: x + FeedForward(norm3(x)), GEGLU activation."""
    ts = [torch.tensor(a, requires_grad=True) for a in args]
    x, scale, bias, w1, b1, w2, b2 = ts
    h, gate = (torch.nn.functional.layer_norm(x, (C,), scale, bias, EPS) @ w1 + b1).chunk(2, dim=-1)
    out = x + (h * torch.nn.functional.gelu(gate)) @ w2 + b2
    out.backward(torch.tensor(d_out))
    return out.detach().numpy(), [t.grad.numpy() for t in ts]


def _branch(*args):
    return pff.feed_forward_branch(*args, EPS, True)


def test_the_branch_gives_torchs_output_and_gradients_in_float32():
    args, d_out = _inputs()
    ref_out, ref_grads = _torch(args, d_out)
    out, vjp = jax.vjp(_branch, *map(jnp.asarray, args))
    assert _rel(out, ref_out) < 1e-6
    for name, g, r in zip(NAMES, vjp(jnp.asarray(d_out)), ref_grads, strict=True):
        assert _rel(g, r) < 1e-5, name


def test_the_kernel_alone_is_the_input_gradient():
    args, d_out = _inputs()
    _, ref_grads = _torch(args, d_out)
    x, scale, bias, w1, b1, w2, _ = map(jnp.asarray, args)
    normed, (mean, rstd) = norm_with_stats(x, scale, bias, (-1,), EPS, tpu=True)
    y = normed @ w1 + b1
    dx = pff.input_grad(jnp.asarray(d_out) @ w2.T, y, w1, x, mean, rstd, scale, jnp.asarray(d_out), interpret=True)
    assert _rel(dx, ref_grads[0]) < 1e-5


def test_the_kernel_split_over_a_mesh_gives_the_same_gradients():
    args, d_out = _inputs()
    _, ref_grads = _torch(args, d_out)
    with jax.set_mesh(Mesh(np.asarray(jax.devices()[:2]), ("data",))):
        grads = jax.jit(jax.grad(lambda *a: jnp.vdot(_branch(*a), jnp.asarray(d_out)), argnums=range(7)))(
            *map(jnp.asarray, args))
        for name, g, r in zip(NAMES, grads, ref_grads, strict=True):
            assert _rel(g, r) < 1e-5, name
        odd = (jnp.zeros((3, L, C)),) * 8  # 3 rows over 2 devices: the kernel declines
        assert pff.sharded_input_grad(*odd, interpret=True) is None


def test_a_batch_that_does_not_split_over_the_mesh_takes_xlas_backward_with_the_same_gradients():
    args, d_out = _inputs()
    args[0], d_out = np.concatenate([args[0], args[0][:1]]), np.concatenate([d_out, d_out[:1]])  # 3 rows
    _, ref_grads = _torch(args, d_out)
    with jax.set_mesh(Mesh(np.asarray(jax.devices()[:2]), ("data",))):
        grad = jax.grad(lambda *a: jnp.vdot(_branch(*a), jnp.asarray(d_out)), argnums=range(7))
        grads = jax.jit(grad)(*map(jnp.asarray, args))
        assert not [n for n, _ in kernel_calls(jax.make_jaxpr(grad)(*map(jnp.asarray, args)).jaxpr)]
    for name, g, r in zip(NAMES, grads, ref_grads, strict=True):
        assert _rel(g, r) < 1e-5, name


def _block(chip):
    block = BasicTransformerBlock(C, 4, C // 4, cross_attention_dim=16, only_cross_attention=False, num_ip_adapters=0,
                                  ip_layer=0, attention_impl=AttentionPolicy(), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    set_target(block, "tpu", chip=chip)
    return block


def test_the_v5p_block_rounds_bfloat16_like_the_xla_backward(monkeypatch):
    """The transformer block on v5p (the kernel) and on v6e (XLA's TPU backward), in bfloat16, against the same
    branch in float32: the same forward, and input gradients as far from float32 as each other."""
    kernel = pff.sharded_input_grad
    monkeypatch.setattr(pff, "sharded_input_grad", lambda *a, interpret: kernel(*a, interpret=True))
    args, d_out = _inputs()
    x = jnp.asarray(args[0], jnp.bfloat16)
    ref, errors, outs = None, [], []
    for chip in ("v5p", "v6e"):
        block = _block(chip)
        assert block.fused_feed_forward_grad == (chip == "v5p")
        out, vjp = jax.vjp(block._feed_forward_branch, x)
        outs.append(out)
        if ref is None:
            norm, geglu, proj = block.norm3, block.ff.net[0].proj, block.ff.net[2]
            params = [norm.scale, norm.bias, geglu.kernel, geglu.bias, proj.kernel, proj.bias]
            _, ref = _torch([args[0], *(np.asarray(p[...], np.float32) for p in params)],
                            np.asarray(jnp.asarray(d_out, jnp.bfloat16), np.float32))
        errors.append(_rel(vjp(jnp.asarray(d_out, jnp.bfloat16))[0], ref[0]))
    np.testing.assert_array_equal(outs[0], outs[1])
    assert errors[0] < 1.2 * errors[1] < 1e-2, errors  # 0.17% each: bfloat16 activations and gradients


def test_only_v5p_targets_take_the_kernel_and_only_where_it_fits():
    def kernels(block, tokens):
        jaxpr = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(block._feed_forward_branch(x).astype(jnp.float32))))(
            jnp.ones((1, tokens, C), jnp.bfloat16))
        return [name for name, _ in kernel_calls(jaxpr.jaxpr)].count(pff.KERNEL_NAME)

    for chip in (None, "v5e", "v6e"):
        assert kernels(_block(chip), L) == 0, chip
    block = _block("v5p")
    assert kernels(block, L) == 1
    assert kernels(block, L - 8) == 0  # tokens not in whole blocks: XLA's backward
    set_target(block, "cpu")
    assert not block.fused_feed_forward_grad and kernels(block, L) == 0
    assert pff.fits(4096, 320, 1280, jnp.bfloat16)  # SD1.5's 64x64 level
    assert not pff.fits(1024, 640, 2560, jnp.bfloat16)  # its 32x32 level: W1 over the VMEM budget

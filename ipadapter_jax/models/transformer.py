"""The UNet's spatial transformer (diffusers `Transformer2DModel`, `BasicTransformerBlock`, GEGLU feed-forward)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models import remat
from ipadapter_jax.models.attention import Attention, Implementation
from ipadapter_jax.models.ip_conditioning import IPConditioning
from ipadapter_jax.models.layers import Conv2d, GroupNorm, LayerNorm, Linear, gelu


class Placeholder(nnx.Module):
    """A parameter-free slot (dropout in PyTorch) that keeps list indices equal to the checkpoint's."""


def _geglu(x):
    h, gate = jnp.split(x, 2, axis=-1)
    return h * gelu(gate)


@jax.custom_vjp
def geglu_recomputing(x):
    """`h * gelu(gate)` of the projection `x = [h, gate]`, whose backward keeps only `x` and computes the gate's
    normal CDF again, as 0.5 + 0.5 erf(gate / sqrt 2). Differentiated plainly, the forward's erfc(-gate / sqrt 2)
    is shared with the backward, and XLA's TPU fusion then writes it to HBM and reads it back (SD1.5 at 32 per
    chip: 0.3 GB per 64x64 block, two extra passes). erf is a different expression from the forward's erfc, so
    XLA cannot merge the two again; the values agree to float32 rounding."""
    return _geglu(x)


def _geglu_fwd(x):
    return _geglu(x), x


def geglu_grads(h, gate, d_out):
    """(d h, d gate) of `h * gelu(gate)`, the CDF computed as 0.5 + 0.5 erf(gate / sqrt 2)."""
    cdf = 0.5 + 0.5 * jax.lax.erf(gate * (2 ** -0.5))
    pdf = jnp.exp(-0.5 * gate * gate) * (2 * jnp.pi) ** -0.5
    return d_out * gate * cdf, d_out * h * (cdf + gate * pdf)


def _geglu_bwd(x, d_out):
    return (jnp.concatenate(geglu_grads(*jnp.split(x, 2, axis=-1), d_out), axis=-1),)


geglu_recomputing.defvjp(_geglu_fwd, _geglu_bwd)


class GEGLU(nnx.Module):
    def __init__(self, dim: int, inner: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.proj = Linear(dim, inner * 2, dtype=dtype, rngs=rngs)
        # static; True in models compiled for TPU (models/target.py): the backward recomputes the gate's CDF
        self.recompute_gate = False

    def __call__(self, x):
        return (geglu_recomputing if self.recompute_gate else _geglu)(self.proj(x))


class FeedForward(nnx.Module):
    def __init__(self, dim: int, *, mult: int = 4, dtype=jnp.float32, rngs: nnx.Rngs):
        inner = dim * mult
        self.net = nnx.List([GEGLU(dim, inner, dtype=dtype, rngs=rngs), Placeholder(),
                             Linear(inner, dim, dtype=dtype, rngs=rngs)])

    def __call__(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, *, cross_attention_dim: int, only_cross_attention: bool,
                 num_ip_adapters: int, ip_layer: int, attention_impl: Implementation, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        common = dict(attention_impl=attention_impl, dtype=dtype, rngs=rngs)
        self.norm1 = LayerNorm(dim, dtype=dtype)
        self.attn1 = Attention(dim, heads, dim_head,
                               cross_attention_dim=cross_attention_dim if only_cross_attention else None, **common)
        self.norm2 = LayerNorm(dim, dtype=dtype)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim=cross_attention_dim,
                               num_ip_adapters=num_ip_adapters, ip_layer=ip_layer, **common)
        self.norm3 = LayerNorm(dim, dtype=dtype)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)
        self.only_cross_attention = only_cross_attention
        self.remat_policy: str | None = None  # models/remat.py
        # static; True in models compiled for TPU chips that keep tokens in the lanes (models/target.py): the
        # feed-forward branch's input gradient is one kernel where it fits (models/pallas_feed_forward.py)
        self.fused_feed_forward_grad = False

    def __call__(self, x_BLC, context_BSC, ip: IPConditioning | None):
        return remat.call(self, lambda block, x, c, ip_: block._forward(x, c, ip_), x_BLC, context_BSC, ip)

    def _forward(self, x_BLC, context_BSC, ip: IPConditioning | None):
        x_BLC = x_BLC + self.attn1(self.norm1(x_BLC), context_BSC if self.only_cross_attention else None)
        x_BLC = x_BLC + self.attn2(self.norm2(x_BLC), context_BSC, ip=ip)
        return self._feed_forward_branch(x_BLC)

    def _feed_forward_branch(self, x_BLC):
        geglu, out, norm = self.ff.net[0], self.ff.net[2], self.norm3
        if self.fused_feed_forward_grad and x_BLC.ndim == 3 and None not in (norm.scale, geglu.proj.bias, out.bias):
            from ipadapter_jax.models import pallas_feed_forward

            w1 = geglu.proj.kernel[...]
            if pallas_feed_forward.fits(x_BLC.shape[1], w1.shape[0], w1.shape[1] // 2, x_BLC.dtype):
                return pallas_feed_forward.feed_forward_branch(
                    x_BLC, norm.scale[...], norm.bias[...], w1, geglu.proj.bias[...], out.kernel[...], out.bias[...],
                    norm.eps, False)
        return x_BLC + self.ff(norm(x_BLC))


class Transformer2DModel(nnx.Module):
    def __init__(self, channels: int, heads: int, *, cross_attention_dim: int, use_linear_projection: bool,
                 only_cross_attention: bool, norm_groups: int = 32, num_ip_adapters: int, ip_layers: tuple[int, ...],
                 attention_impl: Implementation, dtype=jnp.float32, rngs: nnx.Rngs):
        """One `BasicTransformerBlock` per entry of `ip_layers`: each `attn2`'s official layer index."""
        self.norm = GroupNorm(norm_groups, channels, eps=1e-6, dtype=dtype)
        proj = (lambda: Linear(channels, channels, dtype=dtype, rngs=rngs)) if use_linear_projection else (
            lambda: Conv2d(channels, channels, 1, dtype=dtype, rngs=rngs))
        self.proj_in = proj()
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(channels, heads, channels // heads, cross_attention_dim=cross_attention_dim,
                                  only_cross_attention=only_cross_attention, num_ip_adapters=num_ip_adapters,
                                  ip_layer=ip_layer, attention_impl=attention_impl, dtype=dtype, rngs=rngs)
            for ip_layer in ip_layers
        ])
        self.proj_out = proj()

    def __call__(self, x_BHWC: jax.Array, context_BSC: jax.Array, ip: IPConditioning | None = None) -> jax.Array:
        b, h, w, c = x_BHWC.shape
        hidden = self.proj_in(self.norm(x_BHWC)).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            hidden = block(hidden, context_BSC, ip)
        return self.proj_out(hidden.reshape(b, h, w, c)) + x_BHWC

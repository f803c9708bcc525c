"""The Perceiver resampler of IP-Adapter Plus (`Resampler`) and FaceID-Plus (`FacePerceiverResampler`).

Attribute paths are the official ones (`ip_adapter/resampler.py`), so checkpoint keys map by the plain rename
table: `layers.{i}.0.norm1|norm2|to_q|to_kv|to_out`, `layers.{i}.1.0|1|3`, `proj_in`, `proj_out`, `norm_out`.
Every parameter is an `IPAdapterParam`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models.layers import IPAdapterParam, LayerNorm, Linear, gelu, normal_init
from ipadapter_jax.models.transformer import Placeholder

_P = dict(param_type=IPAdapterParam)


class PerceiverAttention(nnx.Module):
    """Latents attend to concat(image features, latents); q and k both scaled by dim_head^-0.25, as upstream."""

    def __init__(self, dim: int, *, dim_head: int, heads: int, dtype=jnp.float32, rngs: nnx.Rngs):
        inner = dim_head * heads
        self.heads = heads
        self.dim_head = dim_head
        self.norm1 = LayerNorm(dim, dtype=dtype, **_P)
        self.norm2 = LayerNorm(dim, dtype=dtype, **_P)
        self.to_q = Linear(dim, inner, use_bias=False, dtype=dtype, rngs=rngs, **_P)
        self.to_kv = Linear(dim, inner * 2, use_bias=False, dtype=dtype, rngs=rngs, **_P)
        self.to_out = Linear(inner, dim, use_bias=False, dtype=dtype, rngs=rngs, **_P)

    def __call__(self, x_BTC: jax.Array, latents_BQC: jax.Array) -> jax.Array:
        x = self.norm1(x_BTC)
        lat = self.norm2(latents_BQC)
        b, q_len, _ = lat.shape
        q_BQHD = self.to_q(lat).reshape(b, q_len, self.heads, self.dim_head)
        kv = self.to_kv(jnp.concatenate([x, lat], axis=1))
        k, v = jnp.split(kv, 2, axis=-1)  # first half K, second half V (torch `chunk(2, -1)`)
        k_BSHD = k.reshape(b, -1, self.heads, self.dim_head)
        v_BSHD = v.reshape(b, -1, self.heads, self.dim_head)
        scale = jnp.asarray(self.dim_head**-0.25, q_BQHD.dtype)
        logits = jnp.einsum("bqhd,bshd->bhqs", q_BQHD * scale, k_BSHD * scale, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1).astype(v_BSHD.dtype)
        out = jnp.einsum("bhqs,bshd->bqhd", probs, v_BSHD, preferred_element_type=jnp.float32).astype(lat.dtype)
        return self.to_out(out.reshape(b, q_len, -1))


def _feed_forward(dim: int, mult: int, dtype, rngs) -> nnx.List:
    """`Sequential(LayerNorm, Linear(dim, mult*dim, no bias), GELU, Linear(mult*dim, dim, no bias))`."""
    return nnx.List([
        LayerNorm(dim, dtype=dtype, **_P),
        Linear(dim, dim * mult, use_bias=False, dtype=dtype, rngs=rngs, **_P),
        Placeholder(),
        Linear(dim * mult, dim, use_bias=False, dtype=dtype, rngs=rngs, **_P),
    ])


def _blocks(dim: int, depth: int, dim_head: int, heads: int, ff_mult: int, dtype, rngs) -> nnx.List:
    # Each layer is the pair [PerceiverAttention, FeedForward Sequential]: parameters at `.0.*` and `.1.0|1|3`.
    return nnx.List([
        nnx.List([PerceiverAttention(dim, dim_head=dim_head, heads=heads, dtype=dtype, rngs=rngs),
                  _feed_forward(dim, ff_mult, dtype, rngs)])
        for _ in range(depth)
    ])


def _run_blocks(layers: nnx.List, x_BTC: jax.Array, latents_BQC: jax.Array) -> jax.Array:
    for attn, ff in layers:
        latents_BQC = attn(x_BTC, latents_BQC) + latents_BQC
        h = ff[3](gelu(ff[1](ff[0](latents_BQC))))
        latents_BQC = h + latents_BQC
    return latents_BQC


class Resampler(nnx.Module):
    """IP-Adapter Plus: `num_queries` learnt latents read the encoder's `hidden_states[-2]`."""

    def __init__(self, *, dim: int, depth: int, dim_head: int, heads: int, num_queries: int, embedding_dim: int,
                 output_dim: int, ff_mult: int = 4, dtype=jnp.float32, rngs: nnx.Rngs):
        self.latents = IPAdapterParam(normal_init(rngs, (1, num_queries, dim), dim**-0.5, dtype))
        self.proj_in = Linear(embedding_dim, dim, dtype=dtype, rngs=rngs, **_P)
        self.proj_out = Linear(dim, output_dim, dtype=dtype, rngs=rngs, **_P)
        self.norm_out = LayerNorm(output_dim, dtype=dtype, **_P)
        self.layers = _blocks(dim, depth, dim_head, heads, ff_mult, dtype, rngs)

    def __call__(self, x_BTC: jax.Array) -> jax.Array:
        x_BTC = x_BTC.astype(self.latents.dtype)
        latents = jnp.broadcast_to(self.latents[...], (x_BTC.shape[0], *self.latents.shape[1:]))
        latents = _run_blocks(self.layers, self.proj_in(x_BTC), latents)
        return self.norm_out(self.proj_out(latents))


class FacePerceiverResampler(nnx.Module):
    """FaceID-Plus: the ID tokens are the queries (no learnt latents) over CLIP `hidden_states[-2]`."""

    def __init__(self, *, dim: int, depth: int, dim_head: int, heads: int, embedding_dim: int, output_dim: int,
                 ff_mult: int = 4, dtype=jnp.float32, rngs: nnx.Rngs):
        self.proj_in = Linear(embedding_dim, dim, dtype=dtype, rngs=rngs, **_P)
        self.proj_out = Linear(dim, output_dim, dtype=dtype, rngs=rngs, **_P)
        self.norm_out = LayerNorm(output_dim, dtype=dtype, **_P)
        self.layers = _blocks(dim, depth, dim_head, heads, ff_mult, dtype, rngs)

    def __call__(self, latents_BQC: jax.Array, x_BTC: jax.Array) -> jax.Array:
        latents = _run_blocks(self.layers, self.proj_in(x_BTC), latents_BQC)
        return self.norm_out(self.proj_out(latents))

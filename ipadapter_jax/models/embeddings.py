"""Sinusoidal timestep features and the small MLP that embeds them (diffusers `Timesteps`, `TimestepEmbedding`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models.layers import Linear, activation


def timestep_features(t: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                      max_period: float = 10000.0) -> jax.Array:
    """(B,) timesteps -> (B, dim) float32 [sin, cos] features (cos first when flipped), as diffusers computes."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    def __init__(self, in_features: int, dim: int, *, act: str = "silu", dtype=jnp.float32, rngs: nnx.Rngs):
        self.linear_1 = Linear(in_features, dim, dtype=dtype, rngs=rngs)
        self.linear_2 = Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(activation(self.act)(self.linear_1(x)))

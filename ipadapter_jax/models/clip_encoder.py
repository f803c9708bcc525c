"""The transformer shared by CLIP's text and vision towers (transformers `CLIPEncoder`), and config reading.

Attribute paths mirror transformers' modules (`encoder.layers.0.self_attn.q_proj`, `layer_norm1`, `mlp.fc1`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.errors import ConfigError
from ipadapter_jax.models.attention import Implementation, attention
from ipadapter_jax.models.attention_policy import as_policy
from ipadapter_jax.models.layers import LayerNorm, Linear, activation

_ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class CLIPEncoderConfig:
    """The fields both towers share, with transformers' `CLIPTextConfig` defaults."""

    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512


def encoder_fields(raw: dict[str, Any], defaults: CLIPEncoderConfig, what: str) -> dict[str, Any]:
    """The shared fields of a config dict, validated; missing ones take `defaults`' values."""
    names = [f.name for f in dataclasses.fields(CLIPEncoderConfig)]
    fields = {name: raw.get(name, getattr(defaults, name)) for name in names}
    if fields["hidden_act"] not in _ACTIVATIONS:
        raise ConfigError(f"{what} config field hidden_act={fields['hidden_act']!r} is not supported "
                          f"(supported: {', '.join(_ACTIVATIONS)}).")
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise ConfigError(f"{what} config field hidden_size={fields['hidden_size']} is not divisible by "
                          f"num_attention_heads={fields['num_attention_heads']}.")
    if fields["projection_dim"] is None:
        fields["projection_dim"] = defaults.projection_dim
    return fields


def tower_config(raw: dict[str, Any], key: str) -> tuple[dict[str, Any], bool]:
    """One tower's config from a tower config or a full `CLIPConfig` (`key` = text_config/vision_config).

    Returns (tower dict, whether it came from a full CLIPConfig). A full CLIPModel's projections use the
    top-level `projection_dim`, so that one wins over the nested (often default-valued) field.
    """
    if raw.get("model_type") != "clip" and key not in raw:
        return raw, False
    tower = dict(raw.get(key) or {})
    if raw.get("projection_dim") is not None:
        tower["projection_dim"] = raw["projection_dim"]
    return tower, True


def causal_attention(q_BLHD: jax.Array, k_BLHD: jax.Array, v_BLHD: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d) + causal mask) v, float32 logits and softmax as transformers computes them."""
    scale = jnp.asarray(q_BLHD.shape[-1] ** -0.5, q_BLHD.dtype)
    logits = jnp.einsum("blhd,bshd->bhls", q_BLHD * scale, k_BLHD, preferred_element_type=jnp.float32)
    n = q_BLHD.shape[1]
    allowed = jnp.tril(jnp.ones((n, n), jnp.bool_))
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BLHD.dtype)
    out = jnp.einsum("bhls,bshd->blhd", probs, v_BLHD, preferred_element_type=jnp.float32)
    return out.astype(q_BLHD.dtype)


class CLIPAttention(nnx.Module):
    def __init__(self, dim: int, heads: int, *, attention_impl: Implementation, dtype, rngs: nnx.Rngs):
        self.heads = heads
        self.attention_impl = as_policy(attention_impl)
        self.q_proj = Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.out_proj = Linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x_BLC: jax.Array, causal: bool) -> jax.Array:
        b, n, _ = x_BLC.shape
        q, k, v = (p(x_BLC).reshape(b, n, self.heads, -1) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = causal_attention(q, k, v) if causal else attention(q, k, v, self.attention_impl)
        return self.out_proj(out.reshape(b, n, -1))


class CLIPMLP(nnx.Module):
    def __init__(self, dim: int, inner: int, act: str, *, dtype, rngs: nnx.Rngs):
        self.fc1 = Linear(dim, inner, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(inner, dim, dtype=dtype, rngs=rngs)
        self.act = activation(act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, c: CLIPEncoderConfig, *, attention_impl: Implementation, dtype, rngs: nnx.Rngs):
        self.self_attn = CLIPAttention(c.hidden_size, c.num_attention_heads, attention_impl=attention_impl,
                                       dtype=dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dtype)
        self.mlp = CLIPMLP(c.hidden_size, c.intermediate_size, c.hidden_act, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dtype)

    def __call__(self, x_BLC: jax.Array, causal: bool) -> jax.Array:
        x_BLC = x_BLC + self.self_attn(self.layer_norm1(x_BLC), causal)
        return x_BLC + self.mlp(self.layer_norm2(x_BLC))


class CLIPEncoder(nnx.Module):
    def __init__(self, c: CLIPEncoderConfig, *, attention_impl: Implementation, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(c, attention_impl=attention_impl, dtype=dtype, rngs=rngs)
                                for _ in range(c.num_hidden_layers)])

    def __call__(self, x_BLC: jax.Array, causal: bool) -> tuple[jax.Array, ...]:
        """All hidden states: the input, then each layer's output (transformers' `hidden_states` tuple).

        Under `jit`, states the caller does not return are never kept, so asking for all of them is free.
        """
        states = [x_BLC]
        for layer in self.layers:
            states.append(layer(states[-1], causal))
        return tuple(states)

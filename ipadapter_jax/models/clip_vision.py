"""The CLIP image encoder (transformers `CLIPVisionModelWithProjection`) in Flax NNX.

IP-Adapter uses ViT-H/14 (hidden 1280, projection 1024) and ViT-bigG/14 (hidden 1664, projection 1280):
`image_embeds` feeds the plain adapters, `hidden_states[-2]` the Plus adapters' Resampler.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.errors import ConfigError
from ipadapter_jax.models.attention import Implementation
from ipadapter_jax.models.clip_encoder import (
    CLIPEncoder,
    CLIPEncoderConfig,
    encoder_fields,
    tower_config,
)
from ipadapter_jax.models.layers import Conv2d, Embed, LayerNorm, Linear, normal_init


def _square(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"CLIP vision config field {name}={value!r} is not supported "
                              "(square sizes only).")
        value = value[0]
    return int(value)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(CLIPEncoderConfig):
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CLIPVisionConfig:
        """An image encoder's `config.json` (`CLIPVisionConfig`) or a full `CLIPConfig`'s `vision_config`."""
        raw, _ = tower_config(raw, "vision_config")
        if raw.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ConfigError(f"config model_type={raw['model_type']!r} is not a CLIP image encoder "
                              "(expected clip_vision_model); point to the image_encoder folder.")
        image_size = _square(raw.get("image_size", cls.image_size), "image_size")
        patch_size = _square(raw.get("patch_size", cls.patch_size), "patch_size")
        if image_size % patch_size:
            raise ConfigError(f"CLIP vision config field image_size={image_size} is not a multiple of "
                              f"patch_size={patch_size}.")
        return cls(**encoder_fields(raw, cls(), "CLIP vision"), image_size=image_size, patch_size=patch_size,
                   num_channels=raw.get("num_channels", cls.num_channels))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CLIPVisionOutput:
    image_embeds: jax.Array  # (B, P) visual_projection(post_layernorm(CLS))
    last_hidden_state: jax.Array  # (B, 1 + N, C) last layer's output, no post_layernorm
    pooler_output: jax.Array  # (B, C) post_layernorm(CLS)
    hidden_states: tuple[jax.Array, ...]  # embeddings after pre_layrnorm, then each layer; [-2] feeds Plus


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, c: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.image_size = c.image_size
        self.class_embedding = nnx.Param(normal_init(rngs, (c.hidden_size,), c.hidden_size**-0.5, dtype))
        self.patch_embedding = Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size,
                                      use_bias=False, dtype=dtype, rngs=rngs)
        self.position_embedding = Embed(c.num_positions, c.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values_BCHW: jax.Array) -> jax.Array:
        b, _, h, w = pixel_values_BCHW.shape
        if (h, w) != (self.image_size, self.image_size):
            s = self.image_size
            raise ValueError(f"the image encoder takes {s}x{s} pixels, got {h}x{w}; "
                             "preprocess images with the encoder's CLIPImageProcessor settings.")
        cls = self.class_embedding[...]
        x_BHWC = jnp.transpose(pixel_values_BCHW, (0, 2, 3, 1)).astype(cls.dtype)
        patches = self.patch_embedding(x_BHWC)
        patches = patches.reshape(b, -1, patches.shape[-1])
        tokens = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, cls.shape[0])), patches], axis=1)
        return tokens + self.position_embedding.embedding[...]


class CLIPVisionTransformer(nnx.Module):
    def __init__(self, c: CLIPVisionConfig, *, attention_impl: Implementation, dtype, rngs: nnx.Rngs):
        self.embeddings = CLIPVisionEmbeddings(c, dtype=dtype, rngs=rngs)
        # "layrnorm" (sic) is transformers' name.
        self.pre_layrnorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dtype)
        self.encoder = CLIPEncoder(c, attention_impl=attention_impl, dtype=dtype, rngs=rngs)
        self.post_layernorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dtype)

    def __call__(self, pixel_values_BCHW: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        states = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values_BCHW)), causal=False)
        return self.post_layernorm(states[-1][:, 0]), states


class CLIPVisionModelWithProjection(nnx.Module):
    """`pixel_values` (B, 3, S, S) float, as `CLIPImageProcessor(return_tensors="np")` makes them."""

    def __init__(self, config: CLIPVisionConfig, *, attention_impl: Implementation = "auto",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        c = self.config = config
        self.vision_model = CLIPVisionTransformer(c, attention_impl=attention_impl, dtype=dtype, rngs=rngs)
        self.visual_projection = Linear(c.hidden_size, c.projection_dim, use_bias=False, dtype=dtype,
                                        rngs=rngs)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def projection_dim(self) -> int:
        return self.config.projection_dim

    def __call__(self, pixel_values_BCHW: jax.Array) -> CLIPVisionOutput:
        pooled, states = self.vision_model(pixel_values_BCHW)
        return CLIPVisionOutput(image_embeds=self.visual_projection(pooled), last_hidden_state=states[-1],
                                pooler_output=pooled, hidden_states=states)

"""CLIP text encoders (transformers `CLIPTextModel`, `CLIPTextModelWithProjection`) in Flax NNX.

SD 1.x/2.x use `CLIPTextModel`; SDXL's `text_encoder_2` is the projection model, whose `text_embeds` is the
pooled conditioning. Causal self-attention and no padding mask, as the Stable Diffusion pipelines call them.
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
from ipadapter_jax.models.layers import Embed, LayerNorm, Linear

# Configs written before transformers PR #24773 carry eos_token_id 2: those pool at argmax(input_ids).
_LEGACY_EOS = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(CLIPEncoderConfig):
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CLIPTextConfig:
        """A text encoder's `config.json` (`CLIPTextConfig`), or the `text_config` of a full `CLIPConfig`."""
        raw, _ = tower_config(raw, "text_config")
        if raw.get("model_type", "clip_text_model") != "clip_text_model":
            raise ConfigError(f"config model_type={raw['model_type']!r} is not a CLIP text encoder "
                              "(expected clip_text_model); point to the text_encoder folder.")
        eos = raw.get("eos_token_id", cls.eos_token_id)
        if not isinstance(eos, int):
            raise ConfigError(f"CLIP text config field eos_token_id={eos!r} is not supported "
                              "(expected one integer).")
        return cls(
            **encoder_fields(raw, cls(), "CLIP text"),
            vocab_size=raw.get("vocab_size", cls.vocab_size),
            max_position_embeddings=raw.get("max_position_embeddings", cls.max_position_embeddings),
            bos_token_id=raw.get("bos_token_id", cls.bos_token_id),
            eos_token_id=eos,
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CLIPTextOutput:
    last_hidden_state: jax.Array  # (B, L, C) after final_layer_norm
    pooler_output: jax.Array  # (B, C) final-normed state at each sequence's EOS token
    hidden_states: tuple[jax.Array, ...]  # embeddings, then each layer; [-2] is the penultimate, un-normed
    text_embeds: jax.Array | None = None  # (B, P) text_projection(pooler_output); projection model only


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, c: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.token_embedding = Embed(c.vocab_size, c.hidden_size, dtype=dtype, rngs=rngs)
        self.position_embedding = Embed(c.max_position_embeddings, c.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids_BL: jax.Array) -> jax.Array:
        n, positions = input_ids_BL.shape[1], self.position_embedding.embedding.shape[0]
        if n > positions:
            raise ValueError(f"{n} tokens exceed the text encoder's {positions} positions; "
                             "truncate the prompt with the tokenizer's max_length.")
        return self.token_embedding(input_ids_BL) + self.position_embedding.embedding[:n]


class CLIPTextTransformer(nnx.Module):
    def __init__(self, c: CLIPTextConfig, *, attention_impl: Implementation, dtype, rngs: nnx.Rngs):
        self.embeddings = CLIPTextEmbeddings(c, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(c, attention_impl=attention_impl, dtype=dtype, rngs=rngs)
        self.final_layer_norm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dtype)
        self.eos_token_id = c.eos_token_id

    def __call__(self, input_ids_BL: jax.Array) -> CLIPTextOutput:
        ids = input_ids_BL.astype(jnp.int32)
        states = self.encoder(self.embeddings(ids), causal=True)
        last = self.final_layer_norm(states[-1])
        if self.eos_token_id == _LEGACY_EOS:
            eos_at = jnp.argmax(ids, axis=-1)
        else:  # the first EOS: the tokenizer may pad with the EOS token itself
            eos_at = jnp.argmax((ids == self.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last, eos_at[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=states)


class CLIPTextModel(nnx.Module):
    """`input_ids` (B, L) integers -> `CLIPTextOutput` (no `text_embeds`)."""

    def __init__(self, config: CLIPTextConfig, *, attention_impl: Implementation = "auto", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        self.text_model = CLIPTextTransformer(config, attention_impl=attention_impl, dtype=dtype, rngs=rngs)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def max_length(self) -> int:
        return self.config.max_position_embeddings

    def __call__(self, input_ids_BL: jax.Array) -> CLIPTextOutput:
        return self.text_model(input_ids_BL)


class CLIPTextModelWithProjection(CLIPTextModel):
    """As `CLIPTextModel`, plus `text_embeds` = `text_projection(pooler_output)` (no bias)."""

    def __init__(self, config: CLIPTextConfig, *, attention_impl: Implementation = "auto", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        super().__init__(config, attention_impl=attention_impl, dtype=dtype, rngs=rngs)
        self.text_projection = Linear(config.hidden_size, config.projection_dim, use_bias=False, dtype=dtype,
                                      rngs=rngs)

    @property
    def projection_dim(self) -> int:
        return self.config.projection_dim

    def __call__(self, input_ids_BL: jax.Array) -> CLIPTextOutput:
        out = self.text_model(input_ids_BL)
        return dataclasses.replace(out, text_embeds=self.text_projection(out.pooler_output))

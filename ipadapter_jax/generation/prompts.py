"""Text prompts: tokenisation on the host, encoding as a pure function (SD1/SD2 last hidden state; SDXL both
encoders' penultimate states concatenated plus encoder 2's pooled projection)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np


def tokenize(tokenizer, prompts: list[str]) -> np.ndarray:
    """(B, model_max_length) int32 ids; over-long prompts are truncated with a warning, as diffusers does."""
    length = tokenizer.model_max_length
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True).input_ids
    full = tokenizer(prompts, padding="longest").input_ids
    for text, row in zip(prompts, full, strict=True):
        if len(row) > length:
            removed = tokenizer.decode(row[length - 1 : -1])
            warnings.warn(f"The following part of the prompt {text[:40]!r}... was truncated because CLIP can only "
                          f"handle sequences up to {length} tokens: {removed}", stacklevel=3)
    return np.asarray(ids, np.int32)


def tokenize_all(tokenizers, prompts: list[str]) -> tuple[np.ndarray, ...]:
    return tuple(tokenize(t, prompts) for t in tokenizers)


def encode(text_encoders, ids: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array | None]:
    """Token ids per encoder -> (context (B, 77, C), pooled (B, P) or None). Pure: call it under jit."""
    if len(text_encoders) == 1:
        return text_encoders[0](ids[0]).last_hidden_state, None
    states, pooled = [], None
    for encoder, token_ids in zip(text_encoders, ids, strict=True):
        out = encoder(token_ids)
        states.append(out.hidden_states[-2])
        pooled = out.text_embeds if out.text_embeds is not None else out.pooler_output
    return jnp.concatenate(states, axis=-1), pooled

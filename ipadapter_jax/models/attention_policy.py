"""Which attention implementation a call uses, decided from the platform the model is compiled for.

A model is built for a target platform ("cpu", "gpu", "tpu"; `models/target.py`), never for the host that
traces it: a CPU host compiling for a TPU slice must not take the CPU paths. `AttentionPolicy` holds the
requested implementation and that platform; it is a static (hashable) attribute of every attention module,
and `choose` turns it into a concrete implementation from the shapes and dtype alone, before anything is
traced, so no choice depends on catching a failure.

- cpu: the chunked (blockwise) path when both sequences are long, XLA otherwise;
- gpu: cuDNN's fused kernel for bfloat16/float16 with head widths it accepts (at most 128, a multiple of 8,
  as `jax.nn.dot_product_attention` requires on every GPU generation), XLA otherwise (SD1.5's 160-wide heads);
- tpu: our Pallas flash-attention kernels (`models/pallas_attention.py`) when both sequences are long (the
  UNet's and VAE's self-attention at 32x32 latents and above), XLA otherwise: cross-attention to 77 text or a
  few image tokens, CLIP and the 16x16 level, whose score matrices are small. The kernels keep the heads in the
  lanes, (B, L, H*D) as the projections write them, or as rows (B*H, L, D), or the tokens in the lanes
  (B*H, D, L), the layout XLA keeps the projections in (`lanes` and `tokens`, set by `models/target.set_target`
  from the chip: tokens on v5p where the keys fit one block, rows beyond, lanes on v5e and v6e), whichever the
  compiler estimates faster for whole programs there (bench/tpu_notes.md); on v5p a training step's kernels also
  keep the softmax probabilities from the forward for the backward (`store_probs`) where the keys fit one block;
  with tokens in the lanes the kernels start at 256 tokens (`TOKENS_MIN_TOKENS`), and a decoupled cross-attention
  whose text and image tokens fit 128 keys together takes one kernel call with a softmax per key set
  (`joins_key_sets`);
- no platform given: XLA everywhere (portable, no target-specific path).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

from ipadapter_jax.errors import ConfigError

Implementation = Literal["auto", "xla", "chunked", "cudnn", "pallas"]
IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "pallas")
PLATFORMS = ("cpu", "gpu", "tpu")

CHUNKED_MIN_TOKENS = 1024  # CPU: both sequences at least this long
CUDNN_MAX_HEAD_DIM = 128
# TPU: both sequences this long go to the Pallas kernels. For cross-attention (S = 77 or a few image tokens) the
# compiler estimates XLA about 3x faster (the kernel pads keys to 128 and heads to 128 lanes; bench/tpu_notes.md).
PALLAS_MIN_TOKENS = 1024
# TPU, tokens layout (v5p): self-attention from 256 tokens on (SD1.5's 16x16 level, 160-wide heads) takes the
# kernels too, and a decoupled cross-attention whose text and image keys fit one 128-lane block together runs as
# one kernel call with a softmax per key set (pallas_tokens.py), where separate XLA calls write every (L, S) score
# matrix to HBM and read it back. The SD1.5 training step at 32 per chip estimates 218.4 ms with the joined calls
# from 1024 queries, 213.1 ms from 256 (bench/tpu_notes.md).
TOKENS_MIN_TOKENS = 256
SEGMENTED_MAX_KEYS = 128


@dataclasses.dataclass(frozen=True)
class AttentionPolicy:
    """The requested implementation and the platform it is compiled for (None: no target-specific path)."""

    requested: Implementation = "auto"
    platform: str | None = None
    lanes: bool = True  # TPU kernels: heads in the lanes (B, L, H*D), else rows (B*H, L, D)
    store_probs: bool = False  # TPU rows kernels: training keeps P for the backward instead of recomputing it
    tokens: bool = False  # TPU kernels: tokens in the lanes (B*H, D, L) where the keys fit one block

    def __post_init__(self):
        if self.requested not in IMPLEMENTATIONS:
            raise ConfigError(f"attention implementation {self.requested!r} is unknown; use one of "
                              f"{', '.join(IMPLEMENTATIONS)}.")
        if self.platform is not None and self.platform not in PLATFORMS:
            raise ConfigError(f"platform {self.platform!r} is unknown; use one of {', '.join(PLATFORMS)}.")

    def for_platform(self, platform: str | None, *, lanes: bool = True, store_probs: bool = False,
                     tokens: bool = False) -> AttentionPolicy:
        return dataclasses.replace(self, platform=platform, lanes=lanes, store_probs=store_probs, tokens=tokens)

    def choose(self, q_shape, k_shape, dtype) -> str:
        """The implementation for queries (B, L, H, D) and keys (B, S, H, D) of `dtype`."""
        l, d, s = q_shape[1], q_shape[3], k_shape[1]
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        cudnn_ok = half and d <= CUDNN_MAX_HEAD_DIM and d % 8 == 0
        if self.requested == "cudnn":
            return "cudnn" if cudnn_ok else "xla"
        if self.requested != "auto":
            return self.requested
        if self.platform == "cpu" and l >= CHUNKED_MIN_TOKENS and s >= CHUNKED_MIN_TOKENS:
            return "chunked"
        if self.platform == "gpu" and cudnn_ok:
            return "cudnn"
        least = TOKENS_MIN_TOKENS if self.tokens else PALLAS_MIN_TOKENS
        if self.platform == "tpu" and l >= least and s >= least:
            return "pallas"
        return "xla"

    def joins_key_sets(self, q_shape, keys: int) -> bool:
        """Whether a cross-attention over several key sets (text, then each adapter's image tokens; `keys` in all)
        runs as one tokens-layout kernel call with a softmax per set (`SEGMENTED_MAX_KEYS`)."""
        return (self.requested in ("auto", "pallas") and self.platform == "tpu" and self.tokens
                and q_shape[1] >= TOKENS_MIN_TOKENS and keys <= SEGMENTED_MAX_KEYS)


def as_policy(implementation: Implementation | AttentionPolicy) -> AttentionPolicy:
    """A policy from a plain name (no platform yet) or an existing policy."""
    if isinstance(implementation, AttentionPolicy):
        return implementation
    return AttentionPolicy(implementation)

"""What an IP-Adapter's projection reads from the CLIP image encoder, and the official negative branch; plus the
host-side CLIP preprocessing. The pipeline, the training loss and the training sample grids all use these."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.data.clip_pixels import clip_pixels
from ipadapter_jax.ip_adapter import check_image_encoder
from ipadapter_jax.models.adapter_spec import IMAGE_EMBEDS, AdapterSpec


def image_features(encoder, pixel_values_NCHW: jax.Array, spec: AdapterSpec, *, negative: bool = False
                   ) -> jax.Array:
    """`image_embeds` (N, P) or `hidden_states[-2]` (N, L, C), whichever `spec` reads. `negative`: the official
    unconditional branch instead: zeros for `image_embeds` adapters (tutorial_train.py), the encoder on an all-zero
    pixel tensor for `hidden_states[-2]` ones (tutorial_train_plus.py)."""
    check_image_encoder(spec, encoder)
    if negative and spec.image_feature == IMAGE_EMBEDS:
        return jnp.zeros((pixel_values_NCHW.shape[0], spec.image_feature_dim), encoder.visual_projection.kernel.dtype)
    out = encoder(jnp.zeros_like(pixel_values_NCHW) if negative else pixel_values_NCHW)
    return out.image_embeds if spec.image_feature == IMAGE_EMBEDS else out.hidden_states[-2]


def image_processor_for(encoder_folder: str | os.PathLike | None, image_size: int = 224):
    """CLIP preprocessing as the official code does it: the encoder folder's `preprocessor_config.json` if
    present, else transformers' CLIP defaults at `image_size` (shortest side, bicubic, centre crop, CLIP mean/std);
    transformers' numbers without importing its image processors (data/clip_pixels.py)."""
    return clip_pixels(encoder_folder, image_size)


def pixel_values(processor, images) -> np.ndarray:
    """(N, 3, S, S) float32 encoder input for PIL images (or HWC uint8 arrays)."""
    return np.asarray(processor(images=images, return_tensors="np")["pixel_values"], np.float32)

"""What the UNet's cross-attention receives per call for its IP-Adapters: tokens, scales, masks and the optional
per-layer controls (key scales, a mean shift of the values, an alternative token set chosen per layer).

All are traced values: changing a scale, a mask or a control never recompiles; only their shapes are static.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerControls:
    """One adapter's controls beyond the output scale; each per-layer array has its adapter's `scales` shape.

    The layer adds `scale * attention(q, key_scale * K', V' + mean_shift * mu)`, K' = to_k_ip(tokens),
    V' = to_v_ip(tokens), mu = V' averaged over the tokens; 1 and 0 leave the plain branch (bit for bit).
    use_alt: 1 where the layer reads `alt_tokens` instead of `tokens` (precise variants, composition images).
    alt_tokens: (B, N_img, T, C), shaped like the adapter's tokens.
    """

    key_scale: jax.Array
    mean_shift: jax.Array
    use_alt: jax.Array
    alt_tokens: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IPConditioning:
    """Per adapter `a` (one entry each, in the order the adapters were loaded):

    tokens[a]: (B, N_img, T, C) projected image tokens; without a mask the N_img images are concatenated
        along the token axis, as diffusers does.
    scales[a]: (n_layers,) scale of each cross-attention layer in the official `ip_adapter.<2i+1>` order,
        (B, n_layers) for a scale per batch row, or (n_layers, N_img) when the adapter has masks (one scale per
        masked image).
    masks[a]: None, or (N_img, H, W) values in [0, 1] at output-image resolution (the same for every batch
        row, negative branch included, as in diffusers); each image then only acts where its mask is set.
    controls: None (the plain decoupled attention), or per adapter its `LayerControls` (or None).
    """

    tokens: tuple[jax.Array, ...]
    scales: tuple[jax.Array, ...]
    masks: tuple[jax.Array | None, ...]
    controls: tuple[LayerControls | None, ...] | None = None


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of torch's `F.interpolate(mode="bicubic", align_corners=False)` along one axis."""
    scale = in_size / out_size
    weights = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        src = (o + 0.5) * scale - 0.5
        base = math.floor(src)
        t = src - base
        for k, w in zip(range(-1, 3), _cubic(np.array([t + 1, t, 1 - t, 2 - t])), strict=True):
            weights[o, min(max(base + k, 0), in_size - 1)] += w
    return weights.astype(np.float32)


def mask_grid(mask_hw: tuple[int, int], num_queries: int) -> tuple[int, int]:
    """The (h, w) grid diffusers resizes a mask to for a layer with `num_queries` positions."""
    h, w = mask_hw
    ratio = w / h
    grid_h = int(math.sqrt(num_queries / ratio))
    grid_h = grid_h + int(num_queries % grid_h != 0)
    return grid_h, num_queries // grid_h


def downsample_mask(mask_NHW: jax.Array, num_queries: int) -> jax.Array:
    """Resize masks to a layer's query count (bicubic, then pad or truncate as diffusers does): (1, N, L)."""
    gh, gw = mask_grid(mask_NHW.shape[1:], num_queries)
    rows = jnp.asarray(bicubic_matrix(mask_NHW.shape[1], gh))
    cols = jnp.asarray(bicubic_matrix(mask_NHW.shape[2], gw))
    small = jnp.einsum("oh,nhw,pw->nop", rows, mask_NHW.astype(jnp.float32), cols,
                       precision=jax.lax.Precision.HIGHEST)
    flat = small.reshape(mask_NHW.shape[0], gh * gw)
    if gh * gw != num_queries:
        warnings.warn("the IP-Adapter mask's aspect ratio differs from the image's; the mask is padded or cut",
                      stacklevel=2)
        flat = flat[:, :num_queries] if gh * gw > num_queries else jnp.pad(flat, ((0, 0), (0, num_queries - gh * gw)))
    return flat[None]

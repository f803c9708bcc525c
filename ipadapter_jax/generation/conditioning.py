"""What the UNet is conditioned on at each denoising step, built once per batch: text states, SDXL's pooled
embedding and `time_ids`, and the IP-Adapter tokens, scales and masks; with classifier-free guidance, the negative
and positive branches interleaved per item ([neg_0, pos_0, neg_1, pos_1, ...]), so that a batch split over
devices keeps each item's two branches on the same device."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.models.ip_conditioning import IPConditioning, LayerControls


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Conditioning:
    context: jax.Array  # (B or 2B, L, C) text states
    pooled: jax.Array | None = None  # SDXL pooled text embeds
    time_ids: jax.Array | None = None  # SDXL (orig_h, orig_w, top, left, target_h, target_w)
    ip: IPConditioning | None = None


def interleave(negative: jax.Array, positive: jax.Array) -> jax.Array:
    """(B, ...) x2 -> (2B, ...) as [neg_0, pos_0, neg_1, pos_1, ...]."""
    return jnp.stack([negative, positive], axis=1).reshape(-1, *positive.shape[1:])


def sdxl_time_ids(rows: int, height: int, width: int, original_size: tuple[int, int] | None = None,
                  crops_coords_top_left: tuple[int, int] = (0, 0)) -> np.ndarray:
    """(rows, 6) float32 SDXL micro-conditioning: original size, crop corner, target size (diffusers' order)."""
    row = np.asarray([*(original_size or (height, width)), *crops_coords_top_left, height, width], np.float32)
    return np.tile(row, (rows, 1))


def unit_ip(tokens_BNTC: jax.Array, num_layers: int, scale: float | jax.Array = 1.0) -> IPConditioning:
    """One adapter at one scale (default 1) on every cross-attention layer, no masks (training, its sample grids
    and its evaluation)."""
    scales = jnp.full((num_layers,), scale, jnp.float32)
    return IPConditioning(tokens=(tokens_BNTC,), scales=(scales,), masks=(None,))


def _guided_ip(negative: IPConditioning, positive: IPConditioning) -> IPConditioning:
    """Tokens interleaved per item; per-row scales and controls (B, n_layers) too; shared ones and masks as they
    are."""
    def rows(n, p, mask):
        return interleave(n, p) if p.ndim == 2 and mask is None else p

    scales = tuple(rows(n, p, m) for n, p, m in zip(negative.scales, positive.scales, positive.masks, strict=True))
    controls = None
    if positive.controls is not None:
        controls = tuple(
            None if p is None else LayerControls(key_scale=rows(n.key_scale, p.key_scale, m),
                                                 mean_shift=rows(n.mean_shift, p.mean_shift, m),
                                                 use_alt=rows(n.use_alt, p.use_alt, m),
                                                 alt_tokens=interleave(n.alt_tokens, p.alt_tokens))
            for n, p, m in zip(negative.controls, positive.controls, positive.masks, strict=True))
    return IPConditioning(tokens=tuple(interleave(n, p) for n, p in zip(negative.tokens, positive.tokens,
                                                                        strict=True)),
                          scales=scales, masks=positive.masks, controls=controls)


def guided(negative: Conditioning, positive: Conditioning) -> Conditioning:
    """The classifier-free-guidance batch: every per-item field of the two branches interleaved."""
    def both(n, p):
        return None if p is None else interleave(n, p)

    ip = None if positive.ip is None else _guided_ip(negative.ip, positive.ip)
    return Conditioning(context=interleave(negative.context, positive.context),
                        pooled=both(negative.pooled, positive.pooled), time_ids=both(negative.time_ids,
                                                                                     positive.time_ids), ip=ip)

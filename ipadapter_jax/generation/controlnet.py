"""ControlNet guidance inside the denoising loop: one or several ControlNets, each with its conditioning image,
a conditioning scale per item and a keep-table over the steps, their residuals summed before the UNet call.

Everything that changes per call (images, scales, the start/end windows) is traced; only the number of
ControlNets and guess mode fix the compiled program. The ControlNets see the text tokens only (never the
IP-Adapter's image tokens) and the 4-channel scaled latents (never an inpainting UNet's mask concat), with SDXL's
`text_embeds`/`time_ids` as the UNet gets them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.generation.conditioning import Conditioning, interleave
from ipadapter_jax.models.controlnet import ControlNetModel


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ControlGuidance:
    images: tuple[jax.Array, ...]  # per ControlNet (B, H, W, C) in [0, 1], one row per item
    scales: tuple[jax.Array, ...]  # per ControlNet (B,) conditioning scale of each item
    keep: jax.Array  # (n_controlnets, num_steps) float32: 1 where the step lies in that ControlNet's window
    guess_mode: bool = dataclasses.field(default=False, metadata=dict(static=True))


def keep_table(starts: Sequence[float], ends: Sequence[float], num_steps: int) -> np.ndarray:
    """(n, num_steps) float32 with diffusers' rule: step i of N is kept unless i/N < start or (i+1)/N > end."""
    rows = [[1.0 - float(i / num_steps < s or (i + 1) / num_steps > e) for i in range(num_steps)]
            for s, e in zip(starts, ends, strict=True)]
    return np.asarray(rows, np.float32).reshape(len(rows), num_steps)


def _rows(x: jax.Array, cfg: bool, positive_only: bool) -> jax.Array:
    """Per-item rows of `x` as the ControlNet batch needs them."""
    if not cfg or positive_only:
        return x
    return jnp.repeat(x, 2, axis=0)  # [neg_0, pos_0, ...] share the item's image and scale


def _positive(x: jax.Array | None) -> jax.Array | None:
    """The conditional rows of an interleaved CFG batch (reshaped, so split rows stay on their device)."""
    return None if x is None else x.reshape(-1, 2, *x.shape[1:])[:, 1]


def control_residuals(controlnets: Sequence[ControlNetModel], guidance: ControlGuidance, i, x_in: jax.Array,
                      t: jax.Array, cond: Conditioning, *, cfg: bool) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """Summed (down residuals, mid residual) of every ControlNet at step `i` for the UNet batch `x_in` (the
    scaled 4-channel latents, interleaved per item under CFG). Guess mode runs the ControlNets on the conditional
    rows only and gives the unconditional rows zero residuals, as diffusers does."""
    guess = guidance.guess_mode and cfg
    x, context = (_positive(x_in), _positive(cond.context)) if guess else (x_in, cond.context)
    pooled, time_ids = (_positive(cond.pooled), _positive(cond.time_ids)) if guess else (cond.pooled, cond.time_ids)
    down = mid = None
    for k, (controlnet, image, scale) in enumerate(zip(controlnets, guidance.images, guidance.scales, strict=True)):
        row_scale = _rows(scale.astype(jnp.float32) * guidance.keep[k, i], cfg, guess)
        d, m = controlnet(x, t, context, _rows(image, cfg, guess), row_scale, text_embeds=pooled, time_ids=time_ids,
                          guess_mode=guidance.guess_mode)
        if down is None:
            down, mid = d, m
        else:  # in ControlNet order, as diffusers' MultiControlNetModel adds them
            down, mid = tuple(a + b for a, b in zip(down, d, strict=True)), mid + m
    if guess:
        down = tuple(interleave(jnp.zeros_like(r), r) for r in down)
        mid = interleave(jnp.zeros_like(mid), mid)
    return down, mid

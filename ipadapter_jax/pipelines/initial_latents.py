"""A batch's random draws (`Noise`) and its initial latents: pure noise (text-to-image), the noised init image
(image-to-image), plus the mask inputs of inpainting (4-channel UNets blend, 9-channel UNets read them)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax import images as imaging
from ipadapter_jax.errors import UserError
from ipadapter_jax.generation import stages
from ipadapter_jax.generation.denoise import Inpainting
from ipadapter_jax.models.resnet import nearest_resize


@dataclasses.dataclass
class Noise:
    """Every random draw of one batch, explicit so that runs can be replayed against another implementation.

    latents: (B, h, w, C) initial noise; image: VAE posterior noise of the init image (img2img, inpainting);
    masked: VAE posterior noise of the masked image (inpainting); keys: (B,) per-item keys for samplers that
    draw fresh noise at every step (Euler ancestral, DDIM with eta > 0).
    """

    latents: np.ndarray
    image: np.ndarray
    masked: np.ndarray
    keys: jax.Array

    @classmethod
    def from_seeds(cls, seeds: Sequence[int], shape: tuple[int, ...]) -> Noise:
        bad = [s for s in seeds if not 0 <= int(s) < 2**32]
        if bad:
            raise UserError(f"seeds must lie in [0, 2**32), not {bad[0]}.")
        keys = jax.vmap(jax.random.key)(jnp.asarray(np.asarray(seeds, np.uint32)))
        parts = jax.vmap(lambda k: jax.random.split(k, 4))(keys)
        draw = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))
        return cls(latents=np.array(draw(parts[:, 0])), image=np.array(draw(parts[:, 1])),
                   masked=np.array(draw(parts[:, 2])), keys=parts[:, 3])


def initial_latents(vae: stages.Bound, place, unet_channels: int, sched, plan, noise: Noise, batch: int, height: int,
                    width: int, init, mask, strength: float) -> tuple[jax.Array, Inpainting | None]:
    """Pure noise (text-to-image), the noised init image (image-to-image), plus mask inputs (inpainting).
    `place(x, rows)` puts a batch-leading array on the pipeline's mesh."""
    if init is None:
        if unet_channels != noise.latents.shape[-1]:
            raise UserError(f"this UNet takes {unet_channels} input channels (an inpainting model): pass "
                            "init_image and mask_image.")
        return jnp.asarray(noise.latents) * plan.init_noise_sigma, None
    inits = init if isinstance(init, (list, tuple)) else [init] * batch
    pixels = np.stack([imaging.vae_input(i, height, width) for i in inits])
    nine = unet_channels == 9
    need_image_latents = mask is None or not nine or strength < 1.0
    image_latents = (stages.vae_encode(vae.graphdef, vae.state, place(pixels, batch),
                                       place(noise.image, batch)) if need_image_latents else None)
    if mask is None:
        return sched.add_noise(plan, image_latents, jnp.asarray(noise.latents), 0), None
    if unet_channels not in (4, 9):
        raise UserError(f"inpainting supports 4- and 9-channel UNets, not {unet_channels}.")
    masks = mask if isinstance(mask, (list, tuple)) else [mask] * batch
    binary = np.stack([imaging.binary_mask(m, height, width) for m in masks])[..., None]
    masked_pixels = np.ascontiguousarray(pixels * (binary < 0.5))
    masked = stages.vae_encode(vae.graphdef, vae.state, place(masked_pixels, batch),
                               place(noise.masked, batch))
    small = nearest_resize(jnp.asarray(binary), noise.latents.shape[1:3])
    if strength == 1.0:
        latents = jnp.asarray(noise.latents) * plan.init_noise_sigma
    else:
        latents = sched.add_noise(plan, image_latents, jnp.asarray(noise.latents), 0)
    inpaint = Inpainting(mask=place(small, batch), masked_latents=masked if nine else None,
                         image_latents=None if nine else image_latents,
                         noise=None if nine else place(jnp.asarray(noise.latents), batch))
    return latents, inpaint

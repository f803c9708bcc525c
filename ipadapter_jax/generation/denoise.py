"""The denoising loop as one pure function (a `lax.fori_loop`), to be called under `jax.jit`.

Batches with classifier-free guidance come interleaved per item (generation/conditioning.py). Latents and
sampler math stay float32; the UNet computes in its own dtype. Guidance, IP scales, masks, the IP window and the
ControlNets' images, scales and windows (generation/controlnet.py) are traced values.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ipadapter_jax.generation.conditioning import Conditioning
from ipadapter_jax.generation.controlnet import ControlGuidance, control_residuals
from ipadapter_jax.models.controlnet import ControlNetModel
from ipadapter_jax.models.ip_conditioning import IPConditioning
from ipadapter_jax.models.unet import UNet2DConditionModel
from ipadapter_jax.schedulers import Plan, Scheduler


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Inpainting:
    mask: jax.Array  # (B, h, w, 1) at latent resolution, 1 = repaint
    masked_latents: jax.Array | None = None  # 9-channel UNets: scaled latents of the masked image
    image_latents: jax.Array | None = None  # 4-channel UNets: scaled latents of the init image, for blending
    noise: jax.Array | None = None  # the noise the init latents were noised with (blending)


def _repeat2(x: jax.Array) -> jax.Array:
    return jnp.repeat(x, 2, axis=0)


def rescale_guidance(guided: jax.Array, positive: jax.Array, factor: jax.Array) -> jax.Array:
    """Guidance rescale (Lin et al. 2023, sec. 3.4) as diffusers computes it, per item."""
    axes = tuple(range(1, guided.ndim))
    std_pos = jnp.std(positive, axis=axes, keepdims=True, ddof=1)
    std_cfg = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    rescaled = factor * (guided * (std_pos / std_cfg)) + (1 - factor) * guided
    return jnp.where(factor > 0, rescaled, guided)


def _ip_at_step(ip: IPConditioning | None, i, num_steps: int, window: jax.Array) -> IPConditioning | None:
    """Zero the IP scales outside the active window [start, end) of the denoising steps (fractions)."""
    if ip is None:
        return None
    frac = i.astype(jnp.float32) / num_steps
    on = ((frac >= window[0]) & (frac < window[1])).astype(jnp.float32)
    return dataclasses.replace(ip, scales=tuple(s * on.astype(s.dtype) for s in ip.scales))


def step_noise(keys: jax.Array, i, shape: tuple[int, ...]) -> jax.Array:
    """Fresh noise for ancestral samplers: per item, from its own key, so it never depends on the batch."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), shape, jnp.float32))(keys)


def denoise(unet: UNet2DConditionModel, scheduler: Scheduler, plan: Plan, latents: jax.Array, cond: Conditioning,
            *, guidance_scale: jax.Array, guidance_rescale: jax.Array, ip_window: jax.Array, keys: jax.Array,
            cfg: bool, inpaint: Inpainting | None = None, controlnets: tuple[ControlNetModel, ...] = (),
            control: ControlGuidance | None = None) -> jax.Array:
    """Run every step of `plan` from `latents` (B, h, w, 4), already scaled by the initial noise sigma.
    `guidance_scale`/`guidance_rescale`: scalars or (B,) per item. `controlnets` with `control`: their summed
    residuals are added to the UNet's skip tensors and mid block at every step."""
    dtype = unet.conv_in.kernel.dtype
    nine_channel = unet.config.in_channels == 9
    if nine_channel and (inpaint is None or inpaint.masked_latents is None):
        raise ValueError("a 9-channel inpainting UNet needs a mask and masked-image latents")
    if len(controlnets) != (0 if control is None else len(control.images)):
        raise ValueError("pass one ControlGuidance image and scale per ControlNet, or neither")
    state = scheduler.init_state(plan, latents.shape, jnp.float32)

    def body(i, carry):
        x, state = carry
        x_in = _repeat2(x) if cfg else x
        x_in = scheduler.scale_model_input(plan, x_in, i)
        residuals = {}
        if controlnets:  # before the inpainting concat: the ControlNets read the 4 latent channels only
            down, mid = control_residuals(controlnets, control, i, x_in, plan.timesteps[i], cond, cfg=cfg)
            residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        if nine_channel:
            extra = jnp.concatenate([inpaint.mask, inpaint.masked_latents], axis=-1)
            x_in = jnp.concatenate([x_in, _repeat2(extra) if cfg else extra], axis=-1)
        out = unet(x_in.astype(dtype), plan.timesteps[i], cond.context, text_embeds=cond.pooled,
                   time_ids=cond.time_ids, ip=_ip_at_step(cond.ip, i, plan.num_steps, ip_window), **residuals)
        out = out.astype(jnp.float32)
        if cfg:
            pairs = out.reshape(x.shape[0], 2, *x.shape[1:])
            negative, positive = pairs[:, 0], pairs[:, 1]
            per_item = (-1,) + (1,) * (x.ndim - 1)  # guidance: a scalar or one value per item
            out = negative + guidance_scale.reshape(per_item) * (positive - negative)
            out = rescale_guidance(out, positive, guidance_rescale.reshape(per_item))
        noise = step_noise(keys, i, x.shape[1:]) if plan.needs_noise else None
        x, state = scheduler.step(plan, state, out, x, i, noise=noise)
        if inpaint is not None and inpaint.image_latents is not None:
            nxt = jnp.minimum(i + 1, plan.num_steps - 1)
            renoised = scheduler.add_noise(plan, inpaint.image_latents, inpaint.noise, nxt)
            known = jnp.where(i < plan.num_steps - 1, renoised, inpaint.image_latents)
            x = (1 - inpaint.mask) * known + inpaint.mask * x
        return x, state

    latents, _ = jax.lax.fori_loop(0, plan.num_steps, body, (latents.astype(jnp.float32), state))
    return latents

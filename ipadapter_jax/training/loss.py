"""The adapter training objective: encode (or read cached encodings), apply the CFG drops, noise the latents,
and the (optionally min-SNR weighted) MSE of the UNet's prediction against noise or velocity.

Per-example randomness (posterior sample, noise, noise offset, timestep) is drawn from
``fold_in(step_key, record_index)``, so a record gets the same draws whatever batch row, device or process
it lands on: losses do not depend on the mesh or the number of processes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ipadapter_jax.errors import ConfigError
from ipadapter_jax.generation.conditioning import unit_ip
from ipadapter_jax.generation.image_features import image_features
from ipadapter_jax.generation.prompts import encode as encode_text
from ipadapter_jax.models.adapter_spec import AdapterSpec
from ipadapter_jax.models.image_proj import project_tokens
from ipadapter_jax.models.vae import scale_latents
from ipadapter_jax.schedulers import ddpm_add_noise, snr, training_target


class Encoded(NamedTuple):
    """Per example: what the frozen encoders produce and the encoder cache stores."""

    moments: jax.Array  # (B, h, w, 2 * latent channels): VAE posterior mean and log-variance
    text: jax.Array  # (B, L, C) text context
    image: jax.Array  # (B, P) image_embeds or (B, 1 + N, D) hidden_states[-2]
    pooled: jax.Array | None = None  # (B, P2) SDXL pooled text embedding


class Unconditional(NamedTuple):
    """What a drop substitutes: the empty prompt's encoding and the dropped image's features."""

    text: jax.Array  # (L, C)
    image: jax.Array  # zeros (P,) for base; features of a zero pixel image (1 + N, D) for Plus/full
    pooled: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class LossSettings:
    prediction_type: str
    num_train_timesteps: int
    vae_scaling: tuple[tuple[str, Any], ...]  # scale_latents keyword arguments, as items (hashable)
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    timesteps: tuple[int, int] | None = None  # draw t from [lo, hi); None: [0, num_train_timesteps)


def loss_settings(config, prediction_type: str, num_train_timesteps: int, vae_scaling) -> LossSettings:
    """The step's `LossSettings` from a training config's `loss` section (`training.config.LossConfig`)."""
    lo = config.min_timestep
    hi = num_train_timesteps if config.max_timestep is None else config.max_timestep
    if hi > num_train_timesteps or lo >= hi:
        raise ConfigError(f"loss.min_timestep/max_timestep ({lo}, {config.max_timestep}) must lie within the "
                          f"scheduler's {num_train_timesteps} training timesteps.")
    timesteps = None if (lo, hi) == (0, num_train_timesteps) else (lo, hi)
    return LossSettings(prediction_type=config.prediction_type or prediction_type,
                        num_train_timesteps=num_train_timesteps, vae_scaling=tuple(vae_scaling),
                        noise_offset=config.noise_offset, min_snr_gamma=config.min_snr_gamma, timesteps=timesteps)


def encode(model, spec: AdapterSpec, batch: dict[str, jax.Array]) -> Encoded:
    """Run the frozen VAE and encoders on a batch of raw examples (no drops applied)."""
    posterior = model.vae.encode(batch["pixel_values"])
    moments = jnp.concatenate([posterior.mean, posterior.logvar], axis=-1)
    ids = (batch["input_ids"], batch["input_ids_2"]) if len(model.text_encoders) == 2 else (batch["input_ids"],)
    text, pooled = encode_text(tuple(model.text_encoders), ids)
    image = image_features(model.image_encoder, batch["clip_pixel_values"], spec)
    return Encoded(moments=moments, text=text, image=image, pooled=pooled)


def unconditional(model, spec: AdapterSpec, empty_ids: tuple[jax.Array, ...], image_size: int) -> Unconditional:
    """The drop substitutes, from the empty prompt's token ids (one row per tokenizer) and a zero image."""
    text, pooled = encode_text(tuple(model.text_encoders), empty_ids)
    dtype = model.image_encoder.vision_model.embeddings.class_embedding.dtype
    image = image_features(model.image_encoder, jnp.zeros((1, 3, image_size, image_size), dtype), spec,
                           negative=True)[0]
    return Unconditional(text=text[0], image=image, pooled=None if pooled is None else pooled[0])


def _where(drop_B: jax.Array, uncond: jax.Array, x: jax.Array) -> jax.Array:
    drop = drop_B.reshape(drop_B.shape + (1,) * (x.ndim - 1))
    return jnp.where(drop, uncond.astype(x.dtype)[None], x)


def apply_drops(enc: Encoded, drop_image: jax.Array, drop_text: jax.Array, uncond: Unconditional) -> Encoded:
    return enc._replace(
        text=_where(drop_text, uncond.text, enc.text),
        image=_where(drop_image, uncond.image, enc.image),
        pooled=None if enc.pooled is None else _where(drop_text, uncond.pooled, enc.pooled),
    )


class Draws(NamedTuple):
    latent_noise: jax.Array  # posterior sample's standard normal
    noise: jax.Array
    timesteps: jax.Array  # int32 (B,)


def draws(step_key: jax.Array, record_index: jax.Array, latent_shape: tuple[int, ...], settings: LossSettings
          ) -> Draws:
    """Per-example random draws keyed by record (module doc); ``latent_shape`` is one example's (h, w, c)."""

    def one(index):
        k_latent, k_noise, k_offset, k_t = jax.random.split(jax.random.fold_in(step_key, index), 4)
        noise = jax.random.normal(k_noise, latent_shape, jnp.float32)
        if settings.noise_offset:
            offset = jax.random.normal(k_offset, (1, 1, latent_shape[-1]), jnp.float32)
            noise = noise + jnp.float32(settings.noise_offset) * offset
        lo, hi = settings.timesteps or (0, settings.num_train_timesteps)
        t = jax.random.randint(k_t, (), lo, hi, jnp.int32)
        return jax.random.normal(k_latent, latent_shape, jnp.float32), noise, t

    return Draws(*jax.vmap(one)(record_index))


def loss_terms(unet, image_proj, spec: AdapterSpec, alphas_cumprod: jax.Array, settings: LossSettings,
               enc: Encoded, time_ids: jax.Array | None, d: Draws):
    """(mean weighted loss, per-example unweighted MSE) for encodings whose drops are already applied."""
    mean, logvar = jnp.split(enc.moments.astype(jnp.float32), 2, axis=-1)
    z = mean + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * d.latent_noise
    latents = scale_latents(z, **dict(settings.vae_scaling))
    noisy = ddpm_add_noise(alphas_cumprod, latents, d.noise, d.timesteps)
    target = training_target(settings.prediction_type, alphas_cumprod, latents, d.noise, d.timesteps)

    def predict(unet, image_proj, noisy, image, text, pooled):
        dtype = unet.conv_in.kernel.dtype
        tokens = project_tokens(image_proj, spec, image)[:, None].astype(dtype)
        return unet(noisy.astype(dtype), d.timesteps, text, text_embeds=pooled, time_ids=time_ids,
                    ip=unit_ip(tokens, unet.num_ip_layers))

    pred = predict(unet, image_proj, noisy, enc.image, enc.text, enc.pooled)
    mse_B = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=(1, 2, 3))
    weights = jnp.ones_like(mse_B)
    if settings.min_snr_gamma is not None:  # diffusers' train_text_to_image.py
        s = snr(alphas_cumprod, d.timesteps)
        weights = jnp.minimum(s, jnp.float32(settings.min_snr_gamma))
        weights = weights / (s + 1.0) if settings.prediction_type == "v_prediction" else weights / s
    return jnp.mean(weights * mse_B), mse_B

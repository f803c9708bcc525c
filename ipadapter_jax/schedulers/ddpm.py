"""Training-side diffusion math (diffusers' `DDPMScheduler.add_noise` / `get_velocity`, `compute_snr`).

Each takes the float32 `alphas_cumprod` table (see `alphas_cumprod_for_config`) and a batch of integer
timesteps `t_B`; per-example scalars broadcast over the trailing axes of `x0`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ipadapter_jax.errors import ConfigError


def _per_example(table: jax.Array, t_B: jax.Array, like: jax.Array) -> tuple[jax.Array, jax.Array]:
    a_B = jnp.asarray(table)[t_B].astype(like.dtype)
    shape = a_B.shape + (1,) * (like.ndim - a_B.ndim)
    return jnp.sqrt(a_B).reshape(shape), jnp.sqrt(1 - a_B).reshape(shape)


def ddpm_add_noise(alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array, t_B: jax.Array) -> jax.Array:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
    signal, noise_scale = _per_example(alphas_cumprod, t_B, x0)
    return signal * x0 + noise_scale * noise


def velocity(alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array, t_B: jax.Array) -> jax.Array:
    """The v-prediction target sqrt(a_t) noise - sqrt(1 - a_t) x0."""
    signal, noise_scale = _per_example(alphas_cumprod, t_B, x0)
    return signal * noise - noise_scale * x0


def snr(alphas_cumprod: jax.Array, t_B: jax.Array) -> jax.Array:
    """Signal-to-noise ratio a_t / (1 - a_t) per timestep, computed as diffusers' `compute_snr` (min-SNR)."""
    a_B = jnp.asarray(alphas_cumprod, jnp.float32)[t_B]
    return (jnp.sqrt(a_B) / jnp.sqrt(1.0 - a_B)) ** 2


def training_target(
    prediction_type: str, alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array, t_B: jax.Array
) -> jax.Array:
    """What the UNet is trained to output: the noise ("epsilon") or the velocity ("v_prediction")."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(alphas_cumprod, x0, noise, t_B)
    raise ConfigError(
        f"prediction_type={prediction_type!r} cannot be trained here; use 'epsilon' or 'v_prediction'."
    )

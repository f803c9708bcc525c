"""diffusers `AutoencoderKL` in Flax NNX, channels-last: config from `vae/config.json`, encode/decode, the
diagonal Gaussian posterior, and the latent scaling the Stable Diffusion pipelines apply."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.errors import ConfigError
from ipadapter_jax.models.attention import Implementation
from ipadapter_jax.models.layers import Conv2d
from ipadapter_jax.models.target import set_target
from ipadapter_jax.models.vae_blocks import Decoder, Encoder


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None  # per channel, used by the SDXL pipelines when set
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True  # pipelines decode in float32 when the VAE was loaded in float16
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AutoencoderKLConfig:
        kind = raw.get("_class_name", "AutoencoderKL")
        if kind != "AutoencoderKL":
            raise ConfigError(f"VAE config field _class_name={kind!r} is not supported (only AutoencoderKL).")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in names}
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        n = len(self.block_out_channels)
        for name, types, supported in (("down_block_types", self.down_block_types, "DownEncoderBlock2D"),
                                       ("up_block_types", self.up_block_types, "UpDecoderBlock2D")):
            for t in types:
                if t != supported:
                    raise ConfigError(f"VAE config field {name} has unsupported block {t!r} "
                                      f"(only {supported!r}).")
            if len(types) != n:
                raise ConfigError(f"VAE config field {name} has {len(types)} entries for {n} "
                                  "block_out_channels.")
        if self.act_fn not in ("silu", "swish"):
            raise ConfigError(f"VAE config field act_fn={self.act_fn!r} is not supported (only 'silu').")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError(f"VAE config field norm_num_groups={self.norm_num_groups} does not divide "
                              f"block_out_channels={self.block_out_channels}.")
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ConfigError("VAE config fields latents_mean and latents_std must be given together.")
        if self.latents_mean is not None:
            if self.shift_factor is not None:
                raise ConfigError("VAE config sets both shift_factor and latents_mean/latents_std; the "
                                  "diffusers pipelines define no scaling for that combination.")
            if {len(self.latents_mean), len(self.latents_std)} != {self.latent_channels}:
                raise ConfigError(f"VAE config fields latents_mean/latents_std need {self.latent_channels} "
                                  "entries (latent_channels).")


class DiagonalGaussian(NamedTuple):
    """The encoder's posterior (diffusers' `DiagonalGaussianDistribution`), log-variance already clamped."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments_BHWC: jax.Array) -> DiagonalGaussian:
        mean, logvar = jnp.split(moments_BHWC, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


def _channel_vector(values, like: jax.Array) -> jax.Array:
    return jnp.asarray(np.asarray(values, np.float32), like.dtype)


def scale_latents(z_BHWC: jax.Array, *, scaling_factor: float, shift_factor: float | None = None,
                  latents_mean=None, latents_std=None) -> jax.Array:
    """VAE latents -> the diffusion model's latents: `(z - shift) * scale`, or SDXL's per-channel
    `(z - mean) * scale / std` when the config gives `latents_mean`/`latents_std`."""
    if latents_mean is not None:
        mean, std = _channel_vector(latents_mean, z_BHWC), _channel_vector(latents_std, z_BHWC)
        return (z_BHWC - mean) * scaling_factor / std
    if shift_factor is not None:
        z_BHWC = z_BHWC - shift_factor
    return z_BHWC * scaling_factor


def unscale_latents(z_BHWC: jax.Array, *, scaling_factor: float, shift_factor: float | None = None,
                    latents_mean=None, latents_std=None) -> jax.Array:
    """The inverse of `scale_latents`: `z / scale + shift` (or `z * std / scale + mean`)."""
    if latents_mean is not None:
        mean, std = _channel_vector(latents_mean, z_BHWC), _channel_vector(latents_std, z_BHWC)
        return z_BHWC * std / scaling_factor + mean
    z_BHWC = z_BHWC / scaling_factor
    return z_BHWC + shift_factor if shift_factor is not None else z_BHWC


class AutoencoderKL(nnx.Module):
    def __init__(self, config: AutoencoderKLConfig, *, attention_impl: Implementation = "auto",
                 platform: str | None = None, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.config = c
        common = dict(layers_per_block=c.layers_per_block, groups=c.norm_num_groups,
                      mid_attention=c.mid_block_add_attention, attention_impl=attention_impl, dtype=dtype,
                      rngs=rngs)
        self.encoder = Encoder(c.in_channels, c.latent_channels, c.block_out_channels, **common)
        self.decoder = Decoder(c.latent_channels, c.out_channels, c.block_out_channels, **common)
        moments = 2 * c.latent_channels
        self.quant_conv = Conv2d(moments, moments, 1, dtype=dtype, rngs=rngs) if c.use_quant_conv else None
        self.post_quant_conv = (Conv2d(c.latent_channels, c.latent_channels, 1, dtype=dtype, rngs=rngs)
                                if c.use_post_quant_conv else None)
        set_target(self, platform)  # what the model is compiled for (models/target.py)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def dtype(self):
        return self.encoder.conv_in.kernel.dtype

    def encode(self, pixels_BHWC: jax.Array) -> DiagonalGaussian:
        """Pixels in [-1, 1] -> the posterior over (unscaled) latents, in the compute dtype."""
        h = self.encoder(pixels_BHWC.astype(self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return DiagonalGaussian.from_moments(h)

    def decode(self, latents_BHWC: jax.Array) -> jax.Array:
        """Unscaled latents -> pixels (about [-1, 1]), in the compute dtype."""
        z = latents_BHWC.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _scaling(self) -> dict:
        c = self.config
        return dict(scaling_factor=c.scaling_factor, shift_factor=c.shift_factor, latents_mean=c.latents_mean,
                    latents_std=c.latents_std)

    def latents_from_pixels(self, pixels_BHWC: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Encode and scale for the diffusion model: a posterior sample with `key`, else its mean."""
        posterior = self.encode(pixels_BHWC)
        z = posterior.mode() if key is None else posterior.sample(key)
        return scale_latents(z, **self._scaling())

    def pixels_from_latents(self, latents_BHWC: jax.Array) -> jax.Array:
        """Undo the diffusion scaling and decode."""
        return self.decode(unscale_latents(latents_BHWC, **self._scaling()))

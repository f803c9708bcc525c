"""ResNet blocks and resampling layers shared by the UNet and the VAE (channels-last)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.models import remat
from ipadapter_jax.models.layers import Conv2d, GroupNorm, Linear


class ResnetBlock2D(nnx.Module):
    """diffusers `ResnetBlock2D` with the default time-embedding add ("default" scale-shift)."""

    def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int | None, groups: int = 32,
                 eps: float = 1e-5, output_scale_factor: float = 1.0, dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, dtype=dtype)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
        self.time_emb_proj = Linear(temb_channels, out_channels, dtype=dtype, rngs=rngs) if temb_channels else None
        self.norm2 = GroupNorm(groups, out_channels, eps=eps, dtype=dtype)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
        self.conv_shortcut = (
            Conv2d(in_channels, out_channels, 1, dtype=dtype, rngs=rngs) if in_channels != out_channels else None
        )
        self.output_scale_factor = output_scale_factor
        self.remat_policy: str | None = None  # models/remat.py

    def __call__(self, x_BHWC: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        return remat.call(self, type(self)._forward, x_BHWC, temb)

    def _forward(self, x_BHWC: jax.Array, temb: jax.Array | None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x_BHWC)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        shortcut = x_BHWC if self.conv_shortcut is None else self.conv_shortcut(x_BHWC)
        out = shortcut + h
        if self.output_scale_factor != 1.0:
            out = out / jnp.asarray(self.output_scale_factor, out.dtype)
        return out


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv. `padding=0` is the VAE encoder's form: pad right and bottom by one first."""

    def __init__(self, channels: int, *, padding: int = 1, dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding, dtype=dtype, rngs=rngs)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        if self.conv.padding == 0:
            x_BHWC = jnp.pad(x_BHWC, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x_BHWC)


def nearest_resize(x_BHWC: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch `F.interpolate(mode="nearest")`: source index floor(dst * in / out)."""
    h, w = x_BHWC.shape[1:3]
    if size == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)
    rows = np.minimum(np.floor(np.arange(size[0]) * (h / size[0])).astype(np.int32), h - 1)
    cols = np.minimum(np.floor(np.arange(size[1]) * (w / size[1])).astype(np.int32), w - 1)
    return x_BHWC[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
    def __init__(self, channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x_BHWC: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        if size is None or tuple(size) == (2 * x_BHWC.shape[1], 2 * x_BHWC.shape[2]):
            return self.conv.upsampled(x_BHWC)
        return self.conv(nearest_resize(x_BHWC, size))

"""UNet down, mid and up blocks (diffusers `CrossAttnDownBlock2D`, `DownBlock2D`, `UNetMidBlock2DCrossAttn`,
`CrossAttnUpBlock2D`, `UpBlock2D`). A block without attention simply has an empty `attentions` list."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models.ip_conditioning import IPConditioning
from ipadapter_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from ipadapter_jax.models.transformer import Transformer2DModel


def _transformer(channels, heads, spec, ip_layers: tuple[int, ...], rngs):
    return Transformer2DModel(channels, heads, ip_layers=ip_layers, rngs=rngs, **spec)


class DownBlock(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, attention: dict | None, heads: int,
                 ip_layers: tuple[tuple[int, ...], ...], add_downsample: bool, resnet: dict,
                 downsample_padding: int, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, dtype=dtype, rngs=rngs, **resnet)
            for i in range(num_layers)
        ])
        self.attentions = nnx.List([_transformer(out_channels, heads, attention, ip_layers[i], rngs)
                                    for i in range(num_layers)] if attention else [])
        self.downsamplers = nnx.List(
            [Downsample2D(out_channels, padding=downsample_padding, dtype=dtype, rngs=rngs)] if add_downsample else []
        )

    def __call__(self, x, temb, context, ip: IPConditioning | None):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if len(self.attentions):
                x = self.attentions[i](x, context, ip)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            skips.append(x)
        return x, skips


class MidBlock(nnx.Module):
    def __init__(self, channels: int, *, heads: int, ip_layers: tuple[tuple[int, ...], ...], attention: dict,
                 resnet: dict, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, dtype=dtype, rngs=rngs, **resnet)
                                 for _ in range(2)])
        self.attentions = nnx.List([_transformer(channels, heads, attention, ip_layers[0], rngs)])

    def __call__(self, x, temb, context, ip: IPConditioning | None):
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            x = resnet(attn(x, context, ip), temb)
        return x


class UpBlock(nnx.Module):
    def __init__(self, prev_channels: int, out_channels: int, skip_in_channels: int, *, num_layers: int,
                 attention: dict | None, heads: int, ip_layers: tuple[tuple[int, ...], ...], add_upsample: bool,
                 resnet: dict, dtype, rngs: nnx.Rngs):
        resnets = []
        for i in range(num_layers):
            skip = skip_in_channels if i == num_layers - 1 else out_channels
            x_in = prev_channels if i == 0 else out_channels
            resnets.append(ResnetBlock2D(x_in + skip, out_channels, dtype=dtype, rngs=rngs, **resnet))
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List([_transformer(out_channels, heads, attention, ip_layers[i], rngs)
                                    for i in range(num_layers)] if attention else [])
        self.upsamplers = nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)] if add_upsample else [])

    def __call__(self, x, skips: list[jax.Array], temb, context, ip: IPConditioning | None,
                 upsample_size: tuple[int, int] | None):
        for i, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), temb)
            if len(self.attentions):
                x = self.attentions[i](x, context, ip)
        for up in self.upsamplers:
            x = up(x, upsample_size)
        return x

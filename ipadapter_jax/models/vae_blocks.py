"""The VAE's encoder and decoder (diffusers `Encoder`/`Decoder` with `DownEncoderBlock2D`, `UpDecoderBlock2D`
and `UNetMidBlock2D`), channels-last. Attribute paths mirror diffusers' module paths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models.attention import Implementation, attention
from ipadapter_jax.models.attention_policy import as_policy
from ipadapter_jax.models.layers import Conv2d, GroupNorm, Linear
from ipadapter_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

EPS = 1e-6  # every norm in diffusers' VAE encoder/decoder


class VAEAttention(nnx.Module):
    """Spatial self-attention of the VAE mid-block: group norm, one head of width `channels`, residual add."""

    def __init__(self, channels: int, *, groups: int, heads: int = 1, rescale_output_factor: float = 1.0,
                 attention_impl: Implementation = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        self.group_norm = GroupNorm(groups, channels, eps=EPS, dtype=dtype)
        self.to_q = Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_k = Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_v = Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_out = nnx.List([Linear(channels, channels, dtype=dtype, rngs=rngs)])
        self.heads = heads
        self.rescale_output_factor = rescale_output_factor
        self.attention_impl = as_policy(attention_impl)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        b, h, w, c = x_BHWC.shape
        x_BLC = self.group_norm(x_BHWC).reshape(b, h * w, c)

        def heads(t_BLC):
            return t_BLC.reshape(b, h * w, self.heads, c // self.heads)

        o_BLHD = attention(heads(self.to_q(x_BLC)), heads(self.to_k(x_BLC)), heads(self.to_v(x_BLC)),
                           self.attention_impl)
        out = self.to_out[0](o_BLHD.reshape(b, h * w, c)).reshape(b, h, w, c) + x_BHWC
        if self.rescale_output_factor != 1.0:
            out = out / jnp.asarray(self.rescale_output_factor, out.dtype)
        return out


class MidBlock(nnx.Module):
    """diffusers `UNetMidBlock2D` without time embedding: resnet, (attention, resnet)."""

    def __init__(self, channels: int, *, groups: int, add_attention: bool, attention_impl: Implementation,
                 dtype, rngs: nnx.Rngs):
        resnet = dict(temb_channels=None, groups=groups, eps=EPS, dtype=dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, **resnet) for _ in range(2)])
        # diffusers keeps a `None` placeholder when attention is off; it holds no weights, so an empty list.
        self.attentions = nnx.List(
            [VAEAttention(channels, groups=groups, attention_impl=attention_impl, dtype=dtype, rngs=rngs)]
            if add_attention else [])

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        x_BHWC = self.resnets[0](x_BHWC)
        for i, resnet in enumerate(self.resnets[1:]):
            if len(self.attentions):
                x_BHWC = self.attentions[i](x_BHWC)
            x_BHWC = resnet(x_BHWC)
        return x_BHWC


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int,
                 add_downsample: bool, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None,
                          groups=groups, eps=EPS, dtype=dtype, rngs=rngs)
            for i in range(num_layers)])
        # padding=0: the encoder pads right/bottom by one, then convolves with stride 2.
        self.downsamplers = nnx.List(
            [Downsample2D(out_channels, padding=0, dtype=dtype, rngs=rngs)] if add_downsample else [])

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x_BHWC = resnet(x_BHWC)
        for down in self.downsamplers:
            x_BHWC = down(x_BHWC)
        return x_BHWC


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int,
                 add_upsample: bool, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None,
                          groups=groups, eps=EPS, dtype=dtype, rngs=rngs)
            for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)] if add_upsample else [])

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x_BHWC = resnet(x_BHWC)
        for up in self.upsamplers:
            x_BHWC = up(x_BHWC)
        return x_BHWC


class Encoder(nnx.Module):
    """Pixels -> `2 * latent_channels` moments (mean and log-variance, before `quant_conv`)."""

    def __init__(self, in_channels: int, latent_channels: int, block_out_channels: tuple[int, ...], *,
                 layers_per_block: int, groups: int, mid_attention: bool, attention_impl: Implementation,
                 dtype, rngs: nnx.Rngs):
        ch = block_out_channels
        self.conv_in = Conv2d(in_channels, ch[0], 3, padding=1, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], num_layers=layers_per_block, groups=groups,
                               add_downsample=i < len(ch) - 1, dtype=dtype, rngs=rngs)
            for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], groups=groups, add_attention=mid_attention,
                                  attention_impl=attention_impl, dtype=dtype, rngs=rngs)
        self.conv_norm_out = GroupNorm(groups, ch[-1], eps=EPS, dtype=dtype)
        self.conv_out = Conv2d(ch[-1], 2 * latent_channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        x_BHWC = self.conv_in(x_BHWC)
        for block in self.down_blocks:
            x_BHWC = block(x_BHWC)
        x_BHWC = self.mid_block(x_BHWC)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x_BHWC)))


class Decoder(nnx.Module):
    """Latents (after `post_quant_conv`) -> pixels."""

    def __init__(self, latent_channels: int, out_channels: int, block_out_channels: tuple[int, ...], *,
                 layers_per_block: int, groups: int, mid_attention: bool, attention_impl: Implementation,
                 dtype, rngs: nnx.Rngs):
        rev = block_out_channels[::-1]
        self.conv_in = Conv2d(latent_channels, rev[0], 3, padding=1, dtype=dtype, rngs=rngs)
        self.mid_block = MidBlock(rev[0], groups=groups, add_attention=mid_attention,
                                  attention_impl=attention_impl, dtype=dtype, rngs=rngs)
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], num_layers=layers_per_block + 1, groups=groups,
                             add_upsample=i < len(rev) - 1, dtype=dtype, rngs=rngs)
            for i in range(len(rev))])
        self.conv_norm_out = GroupNorm(groups, rev[-1], eps=EPS, dtype=dtype)
        self.conv_out = Conv2d(rev[-1], out_channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, z_BHWC: jax.Array) -> jax.Array:
        x_BHWC = self.mid_block(self.conv_in(z_BHWC))
        for block in self.up_blocks:
            x_BHWC = block(x_BHWC)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x_BHWC)))

"""diffusers' `ControlNetModel` in Flax NNX, channels-last: a copy of the UNet's encoder half that reads a
conditioning image and returns one residual per UNet skip tensor plus one for the mid block.

Built from the UNet's own blocks; attribute paths mirror diffusers' (`controlnet_cond_embedding.blocks.3`,
`controlnet_down_blocks.7`, `controlnet_mid_block`). It sees text tokens only: no IP-Adapter branch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.models.attention import Implementation
from ipadapter_jax.models.controlnet_config import ControlNetConfig
from ipadapter_jax.models.embeddings import TimestepEmbedding
from ipadapter_jax.models.layers import Conv2d
from ipadapter_jax.models.unet import time_conditioning
from ipadapter_jax.models.unet_blocks import DownBlock, MidBlock


class ControlNetConditioningEmbedding(nnx.Module):
    """The conditioning image (B, H, W, C) down to the latent grid: 3x3 convs with SiLU, one stride-2 conv per
    step of `block_out_channels`, then `conv_out` to the UNet's first width."""

    def __init__(self, in_channels: int, out_channels: int, block_out_channels: tuple[int, ...], *, dtype,
                 rngs: nnx.Rngs):
        ch = block_out_channels
        self.conv_in = Conv2d(in_channels, ch[0], 3, padding=1, dtype=dtype, rngs=rngs)
        blocks = []
        for c_in, c_out in zip(ch[:-1], ch[1:], strict=True):
            blocks.append(Conv2d(c_in, c_in, 3, padding=1, dtype=dtype, rngs=rngs))
            blocks.append(Conv2d(c_in, c_out, 3, stride=2, padding=1, dtype=dtype, rngs=rngs))
        self.blocks = nnx.List(blocks)
        self.conv_out = Conv2d(ch[-1], out_channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        x = jax.nn.silu(self.conv_in(x_BHWC))
        for conv in self.blocks:
            x = jax.nn.silu(conv(x))
        return self.conv_out(x)


class ControlNetModel(nnx.Module):
    def __init__(self, config: ControlNetConfig, *, attention_impl: Implementation = "auto", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        c = config.backbone
        ch = c.block_out_channels
        conv = dict(dtype=dtype, rngs=rngs)
        self.conv_in = Conv2d(c.in_channels, ch[0], c.conv_in_kernel, padding=c.conv_in_kernel // 2, **conv)
        self.time_embedding = TimestepEmbedding(ch[0], c.time_embed_dim, **conv)
        if c.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, c.time_embed_dim, **conv)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            config.conditioning_channels, ch[0], config.conditioning_embedding_out_channels, **conv)
        resnet = dict(temb_channels=c.time_embed_dim, groups=c.norm_num_groups, eps=c.norm_eps)

        def attention(i: int) -> dict:
            return dict(cross_attention_dim=c.cross_attention_dim[i], use_linear_projection=c.use_linear_projection,
                        only_cross_attention=c.only_cross_attention[i], norm_groups=c.norm_num_groups,
                        num_ip_adapters=0, attention_impl=attention_impl, dtype=dtype)

        down, zero_convs = [], [Conv2d(ch[0], ch[0], 1, **conv)]
        for i, kind in enumerate(c.down_block_types):
            last = i == len(ch) - 1
            down.append(DownBlock(
                ch[i - 1] if i else ch[0], ch[i], num_layers=c.layers_per_block[i],
                attention=attention(i) if kind.startswith("CrossAttn") else None, heads=c.heads[i],
                ip_layers=c.ip_layer_index(f"down_blocks.{i}", c.layers_per_block[i]), add_downsample=not last,
                resnet=resnet, downsample_padding=c.downsample_padding, **conv))
            zero_convs += [Conv2d(ch[i], ch[i], 1, **conv) for _ in range(c.layers_per_block[i] + (not last))]
        self.down_blocks = nnx.List(down)
        self.controlnet_down_blocks = nnx.List(zero_convs)
        self.mid_block = MidBlock(ch[-1], heads=c.heads[-1], ip_layers=c.ip_layer_index("mid_block", 1),
                                  attention=attention(len(ch) - 1),
                                  resnet=dict(resnet, output_scale_factor=c.mid_block_scale_factor), **conv)
        self.controlnet_mid_block = Conv2d(ch[-1], ch[-1], 1, **conv)

    def __call__(self, sample_BHWC: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 controlnet_cond_BHWC: jax.Array, conditioning_scale: jax.Array | float = 1.0, *,
                 text_embeds: jax.Array | None = None, time_ids: jax.Array | None = None,
                 guess_mode: bool = False) -> tuple[tuple[jax.Array, ...], jax.Array]:
        """(down residuals, one per UNet skip tensor; mid residual), each scaled by `conditioning_scale`: a traced
        scalar or one value per batch row. Guess mode ramps the scales from 0.1 (first skip) to 1 (mid block)."""
        c = self.config
        dtype = self.conv_in.kernel.dtype
        batch = sample_BHWC.shape[0]
        temb = time_conditioning(c.backbone, self.time_embedding, getattr(self, "add_embedding", None), timesteps,
                                 batch, dtype, text_embeds, time_ids)
        cond = controlnet_cond_BHWC.astype(dtype)
        if c.channel_order == "bgr":
            cond = cond[..., ::-1]
        context = encoder_hidden_states.astype(dtype)

        x = self.conv_in(sample_BHWC.astype(dtype)) + self.controlnet_cond_embedding(cond)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context, None)
            skips.extend(block_skips)
        x = self.mid_block(x, temb, context, None)
        down = [zero_conv(s) for zero_conv, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid = self.controlnet_mid_block(x)

        scale = jnp.asarray(conditioning_scale, jnp.float32)
        scale = scale.reshape(-1, 1, 1, 1) if scale.ndim == 1 else scale
        if guess_mode and not c.global_pool_conditions:
            ramp = np.logspace(-1, 0, len(down) + 1).astype(np.float32)  # torch.logspace(-1, 0, n) in float32
            scales = [jnp.asarray(r) * scale for r in ramp]
        else:
            scales = [scale] * (len(down) + 1)
        down = [r * s.astype(dtype) for r, s in zip(down, scales[:-1], strict=True)]
        mid = mid * scales[-1].astype(dtype)
        if c.global_pool_conditions:
            down = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return tuple(down), mid

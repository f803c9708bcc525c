"""`UNet2DConditionModel` (SD1.x, SD2.x, SDXL, inpainting) in Flax NNX, channels-last, with the decoupled
IP-Adapter cross-attention built in. Attribute paths mirror diffusers' module paths."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.models.attention import Attention, Implementation
from ipadapter_jax.models.embeddings import TimestepEmbedding, timestep_features
from ipadapter_jax.models.ip_conditioning import IPConditioning
from ipadapter_jax.models.layers import Conv2d, GroupNorm
from ipadapter_jax.models.target import set_target
from ipadapter_jax.models.unet_blocks import DownBlock, MidBlock, UpBlock
from ipadapter_jax.models.unet_config import UNetConfig


def time_conditioning(c: UNetConfig, time_embedding: TimestepEmbedding, add_embedding: TimestepEmbedding | None,
                      timesteps: jax.Array, batch: int, dtype, text_embeds: jax.Array | None,
                      time_ids: jax.Array | None) -> jax.Array:
    """The (B, time_embed_dim) embedding every ResNet gets: the timestep's, plus (SDXL) the pooled text and size
    conditions through `add_embedding`. Shared by the UNet and the ControlNet."""
    t = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    temb = time_embedding(timestep_features(t, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos,
                                                  freq_shift=c.freq_shift).astype(dtype))
    if c.addition_embed_type == "text_time":
        if text_embeds is None or time_ids is None:
            raise ValueError("this SDXL-style model needs text_embeds (pooled) and time_ids")
        time_feats = timestep_features(time_ids.reshape(-1), c.addition_time_embed_dim,
                                       flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift)
        added = jnp.concatenate([text_embeds.astype(jnp.float32), time_feats.reshape(batch, -1)], axis=-1)
        temb = temb + add_embedding(added.astype(dtype))
    return temb


class UNet2DConditionModel(nnx.Module):
    def __init__(self, config: UNetConfig, *, num_ip_adapters: int = 0, attention_impl: Implementation = "auto",
                 platform: str | None = None, dtype=jnp.float32, rngs: nnx.Rngs):
        """`platform`: what the model is compiled for ("cpu", "gpu", "tpu"; None: portable paths only)."""
        c = config
        self.config = c
        self.num_ip_adapters = num_ip_adapters
        ch = c.block_out_channels
        self.conv_in = Conv2d(c.in_channels, ch[0], c.conv_in_kernel, padding=c.conv_in_kernel // 2, dtype=dtype,
                              rngs=rngs)
        self.time_embedding = TimestepEmbedding(ch[0], c.time_embed_dim, dtype=dtype, rngs=rngs)
        if c.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, c.time_embed_dim,
                                                   dtype=dtype, rngs=rngs)
        resnet = dict(temb_channels=c.time_embed_dim, groups=c.norm_num_groups, eps=c.norm_eps)

        def attention(i: int) -> dict:
            return dict(cross_attention_dim=c.cross_attention_dim[i], use_linear_projection=c.use_linear_projection,
                        only_cross_attention=c.only_cross_attention[i], norm_groups=c.norm_num_groups,
                        num_ip_adapters=num_ip_adapters, attention_impl=attention_impl, dtype=dtype)

        down = []
        for i, kind in enumerate(c.down_block_types):
            down.append(DownBlock(
                ch[i - 1] if i else ch[0], ch[i], num_layers=c.layers_per_block[i],
                attention=attention(i) if kind.startswith("CrossAttn") else None, heads=c.heads[i],
                ip_layers=c.ip_layer_index(f"down_blocks.{i}", c.layers_per_block[i]), add_downsample=i < len(ch) - 1,
                resnet=resnet, downsample_padding=c.downsample_padding, dtype=dtype, rngs=rngs))
        self.down_blocks = nnx.List(down)

        rev_ch, rev_heads, rev_layers = ch[::-1], c.heads[::-1], c.layers_per_block[::-1]
        up = []
        for i, kind in enumerate(c.up_block_types):
            up.append(UpBlock(
                rev_ch[i - 1] if i else rev_ch[0], rev_ch[i], rev_ch[min(i + 1, len(ch) - 1)],
                num_layers=rev_layers[i] + 1,
                attention=attention(len(ch) - 1 - i) if kind.startswith("CrossAttn") else None,
                heads=rev_heads[i], ip_layers=c.ip_layer_index(f"up_blocks.{i}", rev_layers[i] + 1),
                add_upsample=i < len(ch) - 1, resnet=resnet, dtype=dtype, rngs=rngs))
        self.up_blocks = nnx.List(up)

        self.mid_block = MidBlock(ch[-1], heads=c.heads[-1], ip_layers=c.ip_layer_index("mid_block", 1),
                                  attention=attention(len(ch) - 1),
                                  resnet=dict(resnet, output_scale_factor=c.mid_block_scale_factor),
                                  dtype=dtype, rngs=rngs)
        self.num_ip_layers = c.num_ip_layers
        self.conv_norm_out = GroupNorm(c.norm_num_groups, ch[0], eps=c.norm_eps, dtype=dtype)
        self.conv_out = Conv2d(ch[0], c.out_channels, c.conv_out_kernel, padding=c.conv_out_kernel // 2,
                               dtype=dtype, rngs=rngs)
        set_target(self, platform)

    def __call__(self, sample_BHWC: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array, *,
                 text_embeds: jax.Array | None = None, time_ids: jax.Array | None = None,
                 ip: IPConditioning | None = None,
                 down_block_additional_residuals: tuple[jax.Array, ...] | None = None,
                 mid_block_additional_residual: jax.Array | None = None) -> jax.Array:
        """Predict noise (or v) for channels-last latents; `text_embeds`/`time_ids` are SDXL's added conditions.

        The additional residuals (a ControlNet's, channels-last) are added, as diffusers adds them, to every skip
        tensor after the down path and to the mid block's output; both or neither."""
        dtype = self.conv_in.kernel.dtype
        temb = time_conditioning(self.config, self.time_embedding, getattr(self, "add_embedding", None), timesteps,
                                 sample_BHWC.shape[0], dtype, text_embeds, time_ids)
        context = encoder_hidden_states.astype(dtype)
        if ip is not None:
            controls = ip.controls and tuple(c and dataclasses.replace(c, alt_tokens=c.alt_tokens.astype(dtype))
                                             for c in ip.controls)
            ip = dataclasses.replace(ip, tokens=tuple(t.astype(dtype) for t in ip.tokens), controls=controls)

        x = self.conv_in(sample_BHWC.astype(dtype))
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context, ip)
            skips.extend(block_skips)
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError("pass both down_block_additional_residuals and mid_block_additional_residual, or neither")
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"the UNet has {len(skips)} skip tensors but "
                                 f"{len(down_block_additional_residuals)} down residuals were given")
            skips = [s + r.astype(dtype) for s, r in zip(skips, down_block_additional_residuals, strict=True)]
        x = self.mid_block(x, temb, context, ip)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual.astype(dtype)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            x = block(x, block_skips, temb, context, ip, skips[-1].shape[1:3] if skips else None)
        x = jax.nn.silu(self.conv_norm_out(x))
        return self.conv_out(x)


def cross_attentions(unet: UNet2DConditionModel) -> list:
    """Every `attn2` module, in the official IP-Adapter numbering order (its `ip_layer`)."""
    found = [m for path, m in nnx.iter_modules(unet) if isinstance(m, Attention) and path[-1] == "attn2"]
    return sorted(found, key=lambda m: m.ip_layer)


def init_ip_from_text(unet: UNet2DConditionModel) -> None:
    """Start every `to_k_ip`/`to_v_ip` as a copy of the layer's `to_k`/`to_v`, as the paper trains them."""
    for attn in cross_attentions(unet):
        for to_k_ip, to_v_ip in zip(attn.to_k_ip, attn.to_v_ip, strict=True):
            to_k_ip.kernel.set_value(attn.to_k.kernel[...])
            to_v_ip.kernel.set_value(attn.to_v.kernel[...])

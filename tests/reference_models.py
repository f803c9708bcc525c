"""Tiny random PyTorch reference models (diffusers/transformers) saved to disk in their real formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SD1_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16,
)
SD2_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=48, attention_head_dim=(2, 4, 8), use_linear_projection=True, upcast_attention=True,
    norm_num_groups=16,
)
SDXL_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 2, 3),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 40, norm_num_groups=16,
)


def randomize_(module, seed: int = 0, std: float = 0.2):
    """Random weights everywhere (diffusers zero-inits some layers, which would hide mapping mistakes)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def save_unet(folder: Path, config: dict, seed: int = 0, **save_kwargs):
    from diffusers import UNet2DConditionModel

    unet = randomize_(UNet2DConditionModel(**config), seed).eval()
    unet.save_pretrained(folder, **save_kwargs)
    return unet


def rel_err(ours, ref) -> float:
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def save_vae(folder: Path, config: dict, seed: int = 0, **save_kwargs):
    from diffusers import AutoencoderKL

    vae = randomize_(AutoencoderKL(**config), seed).eval()
    vae.save_pretrained(folder, **save_kwargs)
    return vae


def save_clip_text(folder: Path, config: dict, *, with_projection: bool, seed: int = 0, **save_kwargs):
    """A random transformers CLIP text encoder (plain or with projection) saved with `save_pretrained`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    model = randomize_(cls(CLIPTextConfig(**config)), seed).eval()
    model.save_pretrained(folder, **save_kwargs)
    return model


def save_clip_vision(folder: Path, config: dict, seed: int = 0, **save_kwargs):
    """A random transformers `CLIPVisionModelWithProjection` (an IP-Adapter image encoder) saved to disk."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    model = randomize_(CLIPVisionModelWithProjection(CLIPVisionConfig(**config)), seed).eval()
    model.save_pretrained(folder, **save_kwargs)
    return model

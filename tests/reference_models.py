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
    """||ours - ref|| / ||ref|| in float64; an all-zero reference must be matched exactly (0, else inf)."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    diff, scale = np.linalg.norm(ours - ref), np.linalg.norm(ref)
    if scale == 0:
        return 0.0 if diff == 0 else float("inf")
    return float(diff / scale)


class NoiseQueue:
    """Stands in for diffusers' randn_tensor: hands out our noise arrays (NHWC -> NCHW) in call order."""

    def __init__(self, torch, arrays):
        self.torch, self.arrays = torch, list(arrays)

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        array = self.arrays.pop(0)
        t = self.torch.from_numpy(np.ascontiguousarray(np.asarray(array).transpose(0, 3, 1, 2)))
        assert tuple(t.shape) == tuple(shape), (t.shape, shape)
        return t.to(dtype or self.torch.float32)


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


def official_ip_adapter(unet, variant: str, *, image_dim: int = 24, tokens: int = 4, resampler: dict | None = None,
                        face_dim: int = 16, lora_rank: int = 0, seed: int = 0, dtype=None) -> dict:
    """A random IP-Adapter state dict in the OFFICIAL nested layout ({"image_proj", "ip_adapter"}, torch tensors),
    written from the official module definitions and numbered from diffusers' `unet.attn_processors` order.

    resampler (plus, faceid-plus): dict(dim, depth, heads, embedding_dim) with dim_head 64 and ff_mult 4.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.float32
    cross = unet.config.cross_attention_dim

    def rnd(*shape):
        return (torch.randn(shape, generator=gen) * 0.2).to(dtype)

    def linear(prefix, n_in, n_out, bias=True):
        out = {f"{prefix}.weight": rnd(n_out, n_in)}
        if bias:
            out[f"{prefix}.bias"] = rnd(n_out)
        return out

    def norm(prefix, n):
        return {f"{prefix}.weight": 1 + rnd(n), f"{prefix}.bias": rnd(n)}

    def perceiver(prefix, dim, depth, heads, embedding_dim, out_dim):
        sd = {**linear(f"{prefix}proj_in", embedding_dim, dim), **linear(f"{prefix}proj_out", dim, out_dim),
              **norm(f"{prefix}norm_out", out_dim)}
        inner = 64 * heads
        for i in range(depth):
            p = f"{prefix}layers.{i}"
            sd.update({**norm(f"{p}.0.norm1", dim), **norm(f"{p}.0.norm2", dim),
                       **linear(f"{p}.0.to_q", dim, inner, False), **linear(f"{p}.0.to_kv", dim, 2 * inner, False),
                       **linear(f"{p}.0.to_out", inner, dim, False), **norm(f"{p}.1.0", dim),
                       **linear(f"{p}.1.1", dim, 4 * dim, False), **linear(f"{p}.1.3", 4 * dim, dim, False)})
        return sd

    if variant == "base":
        proj = {**linear("proj", image_dim, tokens * cross), **norm("norm", cross)}
    elif variant == "full":
        proj = {**linear("proj.0", image_dim, image_dim), **linear("proj.2", image_dim, cross),
                **norm("proj.3", cross)}
    elif variant == "plus":
        r = resampler
        proj = {"latents": rnd(1, tokens, r["dim"]),
                **perceiver("", r["dim"], r["depth"], r["heads"], r["embedding_dim"], cross)}
    elif variant in ("faceid", "faceid-plus"):
        proj = {**linear("proj.0", face_dim, 2 * face_dim), **linear("proj.2", 2 * face_dim, tokens * cross),
                **norm("norm", cross)}
        if variant == "faceid-plus":
            r = resampler
            proj.update(perceiver("perceiver_resampler.", cross, r["depth"], r["heads"], r["embedding_dim"], cross))
    else:
        raise ValueError(variant)

    ip = {}
    for index, name in enumerate(unet.attn_processors):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        hidden, kv_in = attn.to_q.out_features, attn.to_k.in_features
        if name.endswith("attn2.processor"):
            ip[f"{index}.to_k_ip.weight"] = rnd(hidden, cross)
            ip[f"{index}.to_v_ip.weight"] = rnd(hidden, cross)
        if lora_rank:
            for target, n_in in (("to_q", hidden), ("to_k", kv_in), ("to_v", kv_in), ("to_out", hidden)):
                ip[f"{index}.{target}_lora.down.weight"] = rnd(lora_rank, n_in)
                ip[f"{index}.{target}_lora.up.weight"] = rnd(hidden, lora_rank)
    return {"image_proj": proj, "ip_adapter": ip}


def save_official_ip_adapter(state: dict, path: Path) -> Path:
    """Write an official-layout adapter: `.bin` nested via torch.save, `.safetensors` flattened with prefixes."""
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({f"{part}.{k}": v.contiguous() for part, sd in state.items() for k, v in sd.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def controlnet_config(unet_config: dict, **overrides) -> dict:
    """A diffusers `ControlNetModel` config with the encoder half of `unet_config` and a tiny conditioning
    embedding (one stride-2 step: the conditioning image is twice the latent size)."""
    dropped = ("up_block_types", "out_channels", "sample_size")
    return {**{k: v for k, v in unet_config.items() if k not in dropped},
            "conditioning_embedding_out_channels": (8, 16), **overrides}


def save_controlnet(folder: Path, config: dict, seed: int = 0, **save_kwargs):
    """A random diffusers ControlNet (zero convs randomised too, so every mapping shows) saved to disk."""
    from diffusers import ControlNetModel

    model = randomize_(ControlNetModel(**config), seed).eval()
    model.save_pretrained(folder, **save_kwargs)
    return model

"""Official numbering derived from UNet configs (full-size SD1.5/SD2/SDXL), variant detection from full-size key
shapes, and inference of the base model, checked against diffusers' own processor order."""

from __future__ import annotations

import numpy as np
import pytest

from ipadapter_jax.errors import ConfigError
from ipadapter_jax.models.unet_config import STANDARD_BASES, UNetConfig
from ipadapter_jax.weights import ip_adapter_layout as layout
from ipadapter_jax.weights.ip_adapter_files import spec_from_official

SD15 = dict(attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], layers_per_block=2,
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, sample_size=64)
SD21 = dict(SD15, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True)
SDXL = dict(addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
            block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], layers_per_block=2,
            projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True)
CONFIGS = {"sd15": SD15, "sd2": SD21, "sdxl": SDXL}


def _keys_of(config: UNetConfig, block: str) -> list[int]:
    return [layout.official_index(i) for i, layer in enumerate(config.cross_attention_layers())
            if layer.path.startswith(block)]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_numbering_matches_diffusers_processor_order(torch, name):
    """diffusers numbers `ip_adapter.<k>` by enumerating `unet.attn_processors` (attn1 even, attn2 odd)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        ref = UNet2DConditionModel(**CONFIGS[name])
    procs = [n.removesuffix(".processor") for n in ref.attn_processors]
    config = UNetConfig.from_dict(CONFIGS[name])
    layers = [(layer.path, layer.hidden_size) for layer in config.cross_attention_layers()]
    assert [procs[layout.official_index(i)] for i in range(len(layers))] == [p for p, _ in layers]
    assert [procs[layout.official_index(i) - 1] for i in range(len(layers))] == [
        p.removesuffix("attn2") + "attn1" for p, _ in layers]
    assert [ref.get_submodule(p).to_q.out_features for p, _ in layers] == [h for _, h in layers]
    # the built-in standard bases agree
    assert STANDARD_BASES[name].cross_attention_layers() == config.cross_attention_layers()


def test_sd15_and_sdxl_key_ranges():
    sd15 = UNetConfig.from_dict(SD15)
    sdxl = UNetConfig.from_dict(SDXL)
    assert [layout.official_index(i) for i in range(len(sd15.cross_attention_layers()))] == list(range(1, 32, 2))
    assert [layout.official_index(i) for i in range(len(sdxl.cross_attention_layers()))] == list(range(1, 140, 2))
    assert _keys_of(sd15, "down_blocks.0.") == [1, 3]
    assert _keys_of(sd15, "up_blocks.1.") == [13, 15, 17]
    assert _keys_of(sd15, "mid_block.") == [31]
    # InstantStyle: style block up_blocks.0.attentions.1, layout block down_blocks.2.attentions.1.
    assert _keys_of(sdxl, "up_blocks.0.attentions.1.") == list(range(69, 88, 2))
    assert _keys_of(sdxl, "down_blocks.2.attentions.1.") == list(range(29, 48, 2))
    assert _keys_of(sdxl, "mid_block.") == list(range(121, 140, 2))


def _shapes_file(proj: dict, config: UNetConfig, *, lora_rank: int = 0, name: str = "x.bin"):
    """An OfficialFile of zero-stride arrays with full-size shapes (no memory)."""
    zero = np.zeros((), np.float16)
    ip = {}
    cross = config.context_dim
    for i, hidden in enumerate(layer.hidden_size for layer in config.cross_attention_layers()):
        k = layout.official_index(i)
        ip[f"{k}.to_k_ip.weight"] = ip[f"{k}.to_v_ip.weight"] = (hidden, cross)
        for idx, kv_in in ((k - 1, hidden), (k, cross)):
            for t, fan_in in (("to_q", hidden), ("to_k", kv_in), ("to_v", kv_in), ("to_out", hidden)):
                if lora_rank:
                    ip[f"{idx}.{t}_lora.down.weight"] = (lora_rank, fan_in)
                    ip[f"{idx}.{t}_lora.up.weight"] = (hidden, lora_rank)
    arr = lambda s: np.broadcast_to(zero, s)  # noqa: E731
    return layout.OfficialFile({k: arr(s) for k, s in proj.items()}, {k: arr(s) for k, s in ip.items()},
                               __import__("pathlib").Path(name))


def _linear(name, n_in, n_out, bias=True):
    return {f"{name}.weight": (n_out, n_in), **({f"{name}.bias": (n_out,)} if bias else {})}


def _norm(name, n):
    return {f"{name}.weight": (n,), f"{name}.bias": (n,)}


def _perceiver(prefix, dim, heads, emb, out, depth=4):
    sd = {**_linear(f"{prefix}proj_in", emb, dim), **_linear(f"{prefix}proj_out", dim, out),
          **_norm(f"{prefix}norm_out", out)}
    for i in range(depth):
        p = f"{prefix}layers.{i}"
        sd.update({**_norm(f"{p}.0.norm1", dim), **_norm(f"{p}.0.norm2", dim),
                   **_linear(f"{p}.0.to_q", dim, 64 * heads, False), **_linear(f"{p}.0.to_kv", dim, 128 * heads, False),
                   **_linear(f"{p}.0.to_out", 64 * heads, dim, False), **_norm(f"{p}.1.0", dim),
                   **_linear(f"{p}.1.1", dim, 4 * dim, False), **_linear(f"{p}.1.3", 4 * dim, dim, False)})
    return sd


FACE = {**_linear("proj.0", 512, 1024), **_norm("norm", 768)}
RELEASED = {  # file -> (image_proj shapes, base, lora rank, expected fields)
    "ip-adapter_sd15": ({**_linear("proj", 1024, 4 * 768), **_norm("norm", 768)}, "sd15", 0,
                        dict(variant="base", num_tokens=4, image_feature="image_embeds", image_feature_dim=1024)),
    "ip-adapter_sdxl": ({**_linear("proj", 1280, 4 * 2048), **_norm("norm", 2048)}, "sdxl", 0,
                        dict(variant="base", num_tokens=4, image_feature_dim=1280)),
    "ip-adapter_sd21": ({**_linear("proj", 1024, 4 * 1024), **_norm("norm", 1024)}, "sd2", 0,
                        dict(variant="base", cross_attention_dim=1024)),
    "ip-adapter-plus_sd15": ({"latents": (1, 16, 768), **_perceiver("", 768, 12, 1280, 768)}, "sd15", 0,
                             dict(variant="plus", num_tokens=16, image_feature="hidden_states[-2]",
                                  image_feature_dim=1280)),
    "ip-adapter-plus_sdxl_vit-h": ({"latents": (1, 16, 1280), **_perceiver("", 1280, 20, 1280, 2048)}, "sdxl", 0,
                                   dict(variant="plus", num_tokens=16, image_feature_dim=1280)),
    "ip-adapter-full-face_sd15": ({**_linear("proj.0", 1280, 1280), **_linear("proj.2", 1280, 768),
                                   **_norm("proj.3", 768)}, "sd15", 0,
                                  dict(variant="full", num_tokens=257, image_feature_dim=1280)),
    "ip-adapter-faceid_sd15": ({**FACE, **_linear("proj.2", 1024, 4 * 768)}, "sd15", 128,
                               dict(variant="faceid", num_tokens=4, image_feature="none", lora_rank=128)),
    "ip-adapter-faceid-portrait_sd15": ({**FACE, **_linear("proj.2", 1024, 16 * 768)}, "sd15", 0,
                                        dict(variant="faceid-portrait", num_tokens=16, lora_rank=0)),
    "ip-adapter-faceid-plusv2_sd15": ({**FACE, **_linear("proj.2", 1024, 4 * 768),
                                       **_perceiver("perceiver_resampler.", 768, 12, 1280, 768)}, "sd15", 128,
                                      dict(variant="faceid-plus", num_tokens=4, image_feature_dim=1280)),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_layouts_are_detected_and_their_base_inferred(name):
    proj, base, rank, expected = RELEASED[name]
    config = STANDARD_BASES[base]
    f = _shapes_file(proj, config, lora_rank=rank, name=f"{name}.bin")
    spec = spec_from_official(f)  # no UNet given: inferred from 16 x 768 / 16 x 1024 / 70 x 2048
    for field, value in expected.items():
        assert getattr(spec, field) == value, field
    assert spec.layer_paths == tuple(layer.path for layer in config.cross_attention_layers())
    assert spec.cross_attention_dim == config.context_dim
    if spec.resampler is not None:
        heads = {"ip-adapter-plus_sdxl_vit-h": 20}.get(name, 12)
        assert (spec.resampler.heads, spec.resampler.depth, spec.resampler.dim_head) == (heads, 4, 64)
    tensors = layout.official_to_flax(f, spec)  # every key consumed exactly once, full-size shapes checked
    assert len(tensors) == len(f.image_proj) + len(f.ip_adapter)
    image_proj, ip = layout.flax_to_official(tensors, spec)
    assert image_proj.keys() == f.image_proj.keys() and ip.keys() == f.ip_adapter.keys()


def test_key_table_pairs_official_keys_with_unet_paths():
    spec = spec_from_official(_shapes_file(RELEASED["ip-adapter_sdxl"][0], STANDARD_BASES["sdxl"]))
    table = {e.official: e for e in layout.key_table(spec)}
    e = table["ip_adapter.69.to_k_ip.weight"]
    assert e.flax == "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k_ip.kernel"
    assert (e.torch_shape, e.flax_shape) == ((1280, 2048), (2048, 1280))
    assert table["image_proj.norm.weight"].flax == "image_proj.norm.scale"
    assert table["ip_adapter.139.to_v_ip.weight"].flax.startswith("mid_block.attentions.0.transformer_blocks.9.")


def test_nonstandard_size_needs_a_base():
    config = UNetConfig.from_dict(dict(SD15, layers_per_block=1))
    f = _shapes_file(RELEASED["ip-adapter_sd15"][0], config)
    with pytest.raises(ConfigError, match="not a standard SD1.5/SD2.x/SDXL base"):
        spec_from_official(f)
    assert spec_from_official(f, config).num_layers == 10
    with pytest.raises(ConfigError, match="neither sd15, sd2, sdxl nor a UNet folder"):
        spec_from_official(f, "sd3")

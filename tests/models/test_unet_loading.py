"""Full-size UNet architectures built abstractly, checkpoint formats, and clear errors on bad input."""

from __future__ import annotations

import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference_models import SD1_UNET, SD2_UNET, rel_err, save_unet

from ipadapter_jax.errors import CheckpointError, ConfigError, UserError
from ipadapter_jax.models.layers import IPAdapterParam, abstract_model
from ipadapter_jax.models.unet import UNet2DConditionModel
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.weights.diffusers_models import load_unet
from ipadapter_jax.weights.hub import resolve
from ipadapter_jax.weights.torch_layout import flat_variables, to_torch_layout, torch_key

SD15 = {
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True, "freq_shift": 0,
}
SD21 = {**SD15, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "use_linear_projection": True,
        "upcast_attention": True, "sample_size": 96}
SDXL = {
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "in_channels": 4, "out_channels": 4,
}


def _torch_meta_state(config):
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    with torch.device("meta"):
        model = TorchUNet(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name,config,expected", [("sd15", SD15, 859_520_964), ("sd21", SD21, 865_910_724),
                                                   ("sdxl", SDXL, 2_567_463_684)])
def test_full_size_unet_parameters_and_keys_match_pytorch(torch, name, config, expected):
    abstract = abstract_model(lambda: UNet2DConditionModel(UNetConfig.from_dict(config), rngs=nnx.Rngs(0)))
    flat = flat_variables(abstract)
    ours = {torch_key(p): to_torch_layout(str(p[-1]), np.empty(v.shape, np.int8)).shape for p, v in flat.items()}
    reference = _torch_meta_state(config)
    assert ours == reference  # every PyTorch key mapped once, same shape, nothing else
    assert sum(int(np.prod(v.shape)) for v in flat.values()) == sum(int(np.prod(s)) for s in reference.values())
    assert sum(int(np.prod(s)) for s in reference.values()) == expected


def test_sd15_adapter_slots_are_the_22m_paper_count():
    abstract = abstract_model(lambda: UNet2DConditionModel(UNetConfig.from_dict(SD15), num_ip_adapters=1,
                                                          rngs=nnx.Rngs(0)))
    ip = nnx.state(abstract, IPAdapterParam)
    assert sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(ip)) == 19_169_280  # 22.3M minus 3.15M proj


def _forward(unet, cfg):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 5, cfg["cross_attention_dim"])).astype(np.float32)
    return np.asarray(unet(jnp.asarray(x), jnp.asarray([3]), jnp.asarray(ctx)))


@pytest.mark.parametrize("fmt", ["bin", "sharded", "fp16-variant"])
def test_checkpoint_formats_load_the_same_weights(tmp_path, torch, fmt):
    reference = tmp_path / "ref"
    save_unet(reference, SD1_UNET)
    other = tmp_path / fmt
    kwargs = {"bin": dict(safe_serialization=False), "sharded": dict(max_shard_size="200KB"),
              "fp16-variant": dict(variant="fp16")}[fmt]
    ref_model = save_unet(other, SD1_UNET, **kwargs)
    if fmt == "sharded":
        assert (other / "diffusion_pytorch_model.safetensors.index.json").exists()
    if fmt == "fp16-variant":
        ref_model.half().save_pretrained(other, variant="fp16")
    expected = load_unet(reference)
    loaded = load_unet(other, variant="fp16" if fmt == "fp16-variant" else None)
    tol = 1e-3 if fmt == "fp16-variant" else 0.0  # fp16 storage rounds the weights, nothing else may differ
    assert rel_err(_forward(loaded, SD1_UNET), _forward(expected, SD1_UNET)) <= tol


def test_bin_without_torch_says_to_install_the_extra(tmp_path, torch, monkeypatch):
    save_unet(tmp_path, SD1_UNET, safe_serialization=False)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(CheckpointError, match=r"torch extra"):
        load_unet(tmp_path)


def test_truncated_safetensors_is_reported(tmp_path, torch):
    save_unet(tmp_path, SD1_UNET)
    f = tmp_path / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_unet(tmp_path)


def test_checkpoint_of_another_architecture_names_the_keys(tmp_path, torch):
    save_unet(tmp_path, SD2_UNET)
    (tmp_path / "config.json").write_text(json.dumps(SD1_UNET))
    with pytest.raises(CheckpointError, match=r"(missing keys|unexpected keys|shapes do not fit)"):
        load_unet(tmp_path)


def test_shape_mismatch_is_named(tmp_path, torch):
    save_unet(tmp_path, SD1_UNET)
    (tmp_path / "config.json").write_text(json.dumps({**SD1_UNET, "cross_attention_dim": 24}))
    with pytest.raises(CheckpointError, match=r"attn2\.to_k\.weight"):
        load_unet(tmp_path)


def test_unsupported_architecture_names_the_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**SD1_UNET, "class_embed_type": "timestep"}))
    with pytest.raises(ConfigError, match="class_embed_type"):
        load_unet(tmp_path)


def test_missing_subfolder_and_unknown_hub_id_offline(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_unet(tmp_path / "unet")
    with pytest.raises(UserError, match="does not exist"):
        resolve(tmp_path / "nowhere")
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        resolve("nobody-here/no-such-model", subfolders=("unet",))

"""ControlNet folders: the tiny writer's output is a real diffusers checkpoint, checkpoint formats load the same
weights, and wrong folders, unsupported configs and mismatched bases fail with one clear sentence."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from reference_models import SD1_UNET, controlnet_config, rel_err, save_controlnet

from ipadapter_jax.errors import CheckpointError, ConfigError, UserError
from ipadapter_jax.models.controlnet_config import ControlNetConfig
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.tiny_models import write_tiny_controlnet, write_tiny_pipeline
from ipadapter_jax.weights.checkpoint_files import open_weights
from ipadapter_jax.weights.controlnet import check_controlnet, load_controlnet


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    folders = {}
    for kind in ("sd15", "sdxl"):
        base = write_tiny_pipeline(root / kind, kind)
        folders[kind] = (base, write_tiny_controlnet(root / f"{kind}-controlnet", base))
    return folders


def _forward(controlnet, batch=1, size=16, image=64, seed=0):
    rng = np.random.default_rng(seed)
    b = controlnet.config.backbone
    x = jnp.asarray(rng.standard_normal((batch, size, size, 4)), jnp.float32)
    cond = jnp.asarray(rng.uniform(0, 1, (batch, image, image, 3)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((batch, 5, b.context_dim)), jnp.float32)
    added = {}
    if b.addition_embed_type:
        pooled = b.projection_class_embeddings_input_dim - 6 * b.addition_time_embed_dim
        added = dict(text_embeds=jnp.ones((batch, pooled)), time_ids=jnp.tile(jnp.float32([64, 64, 0, 0, 64, 64]),
                                                                               (batch, 1)))
    down, mid = controlnet(x, jnp.asarray([500]), ctx, cond, 1.0, **added)
    return [np.asarray(d) for d in (*down, mid)]


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_tiny_controlnet_is_a_diffusers_checkpoint_for_its_base(tiny, torch, kind):
    from diffusers import ControlNetModel

    base, folder = tiny[kind]
    config = json.loads((folder / "config.json").read_text())
    reference = ControlNetModel.from_config(config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    weights = open_weights(folder, "diffusion_pytorch_model")
    assert {k: weights.shape(k) for k in weights} == expected  # every key diffusers has, and nothing else

    controlnet = load_controlnet(folder)
    unet_config = UNetConfig.from_json(base / "unet" / "config.json")
    check_controlnet(controlnet, unet_config)
    residuals = _forward(controlnet)  # a 64 px image meets the 16x16 latents of the tiny pipeline
    assert residuals[0].shape == (1, 16, 16, unet_config.block_out_channels[0])
    assert len(residuals) == controlnet.config.num_down_residuals + 1


def test_sdxl_controlnet_on_sd15_unet_names_both_and_the_fix(tiny):
    sdxl_controlnet = ControlNetConfig.from_dict(json.loads((tiny["sdxl"][1] / "config.json").read_text()))
    sd15_unet = UNetConfig.from_json(tiny["sd15"][0] / "unet" / "config.json")
    with pytest.raises(UserError, match=r"trained for SDXL.*base UNet is SD1\.x.*load a ControlNet trained for "
                                        r"SD1\.x \(e\.g\. lllyasviel/control_v11p_sd15_canny\)"):
        check_controlnet(sdxl_controlnet, sd15_unet, name="controlnet-canny-sdxl")
    sd15_controlnet = ControlNetConfig.from_dict(json.loads((tiny["sd15"][1] / "config.json").read_text()))
    wider = UNetConfig.from_dict({**json.loads((tiny["sd15"][0] / "unet" / "config.json").read_text()),
                                  "block_out_channels": [32, 96]})
    with pytest.raises(UserError, match=r"does not fit the base UNet \(block_out_channels differ\)"):
        check_controlnet(sd15_controlnet, wider)


@pytest.mark.parametrize("fmt", ["bin", "fp16-variant"])
def test_checkpoint_formats_load_the_same_weights(tmp_path, torch, fmt):
    config = controlnet_config(SD1_UNET)
    reference = tmp_path / "ref"
    model = save_controlnet(reference, config)
    other = tmp_path / fmt
    if fmt == "bin":
        model.save_pretrained(other, safe_serialization=False)
    else:
        model.save_pretrained(other)
        model.half().save_pretrained(other, variant="fp16")
    expected = _forward(load_controlnet(reference), size=16, image=32)
    loaded = load_controlnet(other, variant="fp16" if fmt == "fp16-variant" else None)
    tol = 1e-3 if fmt == "fp16-variant" else 0.0  # fp16 storage rounds the weights, nothing else may differ
    assert max(rel_err(a, b) for a, b in zip(_forward(loaded, size=16, image=32), expected, strict=True)) <= tol


def test_unet_folder_and_unsupported_configs_are_named(tmp_path, tiny):
    with pytest.raises(ConfigError, match="UNet2DConditionModel.*not a ControlNetModel"):
        load_controlnet(tiny["sd15"][0] / "unet")
    raw = json.loads((tiny["sd15"][1] / "config.json").read_text())
    for field, value in [("mid_block_type", "UNetMidBlock2D"), ("class_embed_type", "timestep"),
                         ("controlnet_conditioning_channel_order", "rbg"), ("resnet_time_scale_shift", "scale_shift"),
                         ("addition_embed_type", "text")]:
        with pytest.raises(ConfigError, match=f"ControlNet config field {field}"):
            ControlNetConfig.from_dict({**raw, field: value})


def test_missing_and_misshaped_keys_are_named(tmp_path, tiny):
    folder = tiny["sd15"][1]
    (tmp_path / "narrow").mkdir()
    raw = json.loads((folder / "config.json").read_text())
    (tmp_path / "narrow" / "config.json").write_text(json.dumps({**raw, "conditioning_embedding_out_channels":
                                                                 [8, 16, 32, 64]}))
    (tmp_path / "narrow" / "diffusion_pytorch_model.safetensors").symlink_to(
        folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys: controlnet_cond_embedding\.blocks\.4"):
        load_controlnet(tmp_path / "narrow")
    (tmp_path / "narrow" / "config.json").write_text(json.dumps({**raw, "conditioning_channels": 1}))
    with pytest.raises(CheckpointError, match=r"controlnet_cond_embedding\.conv_in\.weight"):
        load_controlnet(tmp_path / "narrow")


# The config.json of lllyasviel/control_v11p_sd15_canny and of diffusers/controlnet-canny-sdxl-1.0 (fields as on
# the Hub; SD2.1 ControlNets are the SD2.1 UNet's encoder half with linear projections).
SD15_CANNY = {
    "_class_name": "ControlNetModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "class_embed_type": None,
    "conditioning_embedding_out_channels": [16, 32, 96, 256], "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "num_class_embeds": None,
    "only_cross_attention": False, "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default", "upcast_attention": False, "use_linear_projection": False,
}
SD21 = {**SD15_CANNY, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
        "use_linear_projection": True, "upcast_attention": True}
SDXL_CANNY = {
    "_class_name": "ControlNetModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "class_embed_type": None, "conditioning_channels": 3,
    "conditioning_embedding_out_channels": [16, 32, 96, 256], "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "global_pool_conditions": False, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None,
    "num_class_embeds": None, "only_cross_attention": False, "projection_class_embeddings_input_dim": 2816,
    "resnet_time_scale_shift": "default", "transformer_layers_per_block": [1, 2, 10], "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_SMALL = {**SDXL_CANNY, "transformer_layers_per_block": [0, 0, 1]}


@pytest.mark.parametrize("config", [SD15_CANNY, SD21, SDXL_CANNY, SDXL_SMALL], ids=["sd15", "sd21", "sdxl", "small"])
def test_full_size_controlnet_keys_and_shapes_match_pytorch(torch, config):
    from diffusers import ControlNetModel as TorchControlNet
    from flax import nnx

    from ipadapter_jax.models.controlnet import ControlNetModel
    from ipadapter_jax.models.layers import abstract_model
    from ipadapter_jax.weights.torch_layout import flat_variables, to_torch_layout, torch_key

    with torch.device("meta"):
        reference = {k: tuple(v.shape) for k, v in TorchControlNet.from_config(config).state_dict().items()}
    abstract = abstract_model(lambda: ControlNetModel(ControlNetConfig.from_dict(config), rngs=nnx.Rngs(0)))
    ours = {torch_key(p): to_torch_layout(str(p[-1]), np.empty(v.shape, np.int8)).shape
            for p, v in flat_variables(abstract).items()}
    assert ours == reference  # every key of the real checkpoints, with its shape, and nothing else

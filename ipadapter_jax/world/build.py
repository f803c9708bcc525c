"""The shapes world's model folders: a diffusers Stable Diffusion folder (base) and a CLIP image encoder.

Every part except the UNet is fixed by construction or by a seed, so it is written on demand: the exact VAE
(`world.vae`), a tiny random CLIP text encoder and byte-level tokenizer, a DDIM-ready scheduler config, and a
tiny random CLIP image encoder (one 32 x 32 patch: its random projection of the whole image keeps colours and
position linearly readable). The UNet is trained on the world (`world.base_training`); a trained one ships
in `assets/` (regenerate it with `python -m ipadapter_jax.world_assets`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ipadapter_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from ipadapter_jax.tiny_models import (
    SCHEDULER,
    TINY_TEXT,
    write_random_image_encoder,
    write_random_model,
    write_tiny_tokenizer,
)
from ipadapter_jax.world.scenes import SIZE
from ipadapter_jax.world.vae import LATENT_CHANNELS, write_world_vae

ASSETS = Path(__file__).with_name("assets")
SHIPPED_UNET = ASSETS / "unet.safetensors"  # diffusers UNet2DConditionModel weights (float16)
SHIPPED_ADAPTER = ASSETS / "ip-adapter_world.safetensors"  # official IP-Adapter layout (float16)
TEXT_SEED, ENCODER_SEED = 2, 1

UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.30.0",
    "sample_size": SIZE // 2,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "layers_per_block": 1,
    # Attention at 8 x 8 and 4 x 4, none at 16 x 16 (2x faster on CPU). The 4 x 4 level puts every position
    # next to the zero padding, from which a UNet tells where it is: with two levels the base never learned to
    # place a shape in the quadrant its caption names (0.27 against 0.25 by chance after 5000 steps).
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": TINY_TEXT["hidden_size"],
    "attention_head_dim": 2,
    "norm_num_groups": 16,
}
IMAGE_ENCODER = {
    "architectures": ["CLIPVisionModelWithProjection"],
    "model_type": "clip_vision_model",
    "image_size": SIZE,
    "patch_size": SIZE,
    # Wide enough that the image embedding keeps the attributes linearly readable (least squares on 2500 scenes,
    # 500 held out: shape colour 0.87, background 1.0, quadrant 0.97; at width 128 the colour read 0.77).
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "projection_dim": 512,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "num_channels": 3,
}
# Cosine noise (Nichol & Dhariwal: meant for low resolutions) with v-prediction, sampled from t = 999
# ("trailing"). With Stable Diffusion's scaled-linear schedule a 16 x 16 latent of flat colours keeps its mean
# colour visible in x_t even at t = 999, so training never needs the condition to decide colours; sampling
# then takes them from the initial noise. Here the highest noise levels hide them and v-prediction (not
# epsilon, whose x0 estimate is unstable there) must predict them from the conditioning.
SCHEDULER_CONFIG = {**SCHEDULER, "_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2",
                    "prediction_type": "v_prediction", "timestep_spacing": "trailing", "steps_offset": 0,
                    "clip_sample": False, "set_alpha_to_one": False}


def write_world_base(folder: str | Path, unet_weights: str | Path | None = SHIPPED_UNET) -> Path:
    """A diffusers pipeline folder for the world. `unet_weights`: a UNet safetensors file to copy (default: the
    shipped trained one), or None to leave `unet/` holding only its config (`base_training` fills it)."""
    from flax import nnx


    folder = Path(folder)
    write_world_vae(folder / "vae")
    write_random_model(folder / "text_encoder", TINY_TEXT,
                       lambda: CLIPTextModel(CLIPTextConfig.from_dict(TINY_TEXT), rngs=nnx.Rngs(0)), "model",
                       TEXT_SEED)
    write_tiny_tokenizer(folder / "tokenizer")
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    (folder / "unet" / "config.json").write_text(json.dumps(UNET, indent=2))
    if unet_weights is not None:
        shutil.copyfile(unet_weights, folder / "unet" / "diffusion_pytorch_model.safetensors")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_world_image_encoder(folder: str | Path) -> Path:
    """The world's CLIP image encoder folder (transformers `CLIPVisionModelWithProjection` + preprocessor)."""
    return write_random_image_encoder(folder, IMAGE_ENCODER, ENCODER_SEED)

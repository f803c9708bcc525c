"""The shapes world's model folders: a diffusers Stable Diffusion folder (base) and a CLIP image encoder.

Every part except the UNet is fixed by construction or by a seed, so it is written on demand: the exact VAE
(`world.vae`), a tiny random CLIP text encoder and byte-level tokenizer, a DDIM-ready scheduler config, and a
tiny random CLIP image encoder (one 32 x 32 patch: its random projection of the whole image keeps colours and
position linearly readable) whose embedding is whitened over the world's scenes. The UNet is trained on the world
(`world.base_training`); a trained one ships in `assets/` (regenerate it with
`python -m ipadapter_jax.world_assets`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ipadapter_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from ipadapter_jax.tiny_models import (
    SCHEDULER,
    TINY_TEXT,
    write_random_image_encoder,
    write_random_model,
    write_tiny_tokenizer,
)
from ipadapter_jax.world.scenes import SIZE, random_scene, render
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
    # Attention at 8 x 8, 4 x 4 and 2 x 2, none at 16 x 16 (2x faster on CPU). A UNet has no position embedding:
    # it tells where it is from the zero padding, and at 2 x 2 every position is a corner, one per quadrant. With
    # two levels the base never learned to place a shape in the quadrant its caption names (0.27 against 0.25
    # by chance after 5000 steps), with three 0.39 (all attributes named), with four 0.47 (0.81 with the
    # quadrant alone named).
    "block_out_channels": [32, 64, 64, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
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


WHITEN_SCENES, WHITEN_SEED, WHITEN_EPS = 4096, 7, 1e-2


def write_world_image_encoder(folder: str | Path) -> Path:
    """The world's CLIP image encoder folder (transformers `CLIPVisionModelWithProjection` + preprocessor): a random
    ViT whose `image_embeds` are whitened over the world's scenes.

    A random encoder's embedding is a near-linear image of the pixels, so the background, which covers most of
    them, holds 75% of its variance and the shape's colour and quadrant 2.4% and 1% (R^2 of least squares on 600
    scenes). An adapter's projection then learns the background in a few hundred steps and never the rest. A real
    CLIP embedding is semantic rather than pixel-weighted; whitening (ZCA over `WHITEN_SCENES` random scenes,
    eigenvalues regularised by `WHITEN_EPS` times their mean) gives every direction of the world's scenes the same
    variance. It rewrites the post-layernorm bias (centering) and `visual_projection`; `hidden_states` are the
    random ViT's."""
    import jax
    import jax.numpy as jnp

    from ipadapter_jax.generation.image_features import image_processor_for, pixel_values
    from ipadapter_jax.weights.diffusers_models import load_image_encoder
    from ipadapter_jax.weights.safetensors_io import SafetensorsFile, save_safetensors

    folder = write_random_image_encoder(folder, IMAGE_ENCODER, ENCODER_SEED)
    # preprocessor_config.json marks a finished folder (world.inputs): set aside until the weights are whitened.
    marker = folder / "preprocessor_config.json"
    processor, marker_text = image_processor_for(folder), marker.read_text()
    marker.unlink()
    rng = np.random.default_rng(WHITEN_SEED)
    scenes = [random_scene(rng) for _ in range(WHITEN_SCENES)]
    pixels = pixel_values(processor, [render(s) for s in scenes])
    encoder = load_image_encoder(folder)
    pooled = np.asarray(jax.jit(lambda m, x: m(x).pooler_output)(encoder, jnp.asarray(pixels)), np.float64)
    mean = pooled.mean(0)
    values, vectors = np.linalg.eigh(np.cov(pooled - mean, rowvar=False))
    values = np.maximum(values, 0.0) + WHITEN_EPS * values.mean()
    zca = (vectors / np.sqrt(values)) @ vectors.T  # symmetric: torch's [out, in] layout as it is
    path = folder / "model.safetensors"
    f = SafetensorsFile(path)
    tensors = {k: np.array(f[k]) for k in f}
    del f
    bias = "vision_model.post_layernorm.bias"
    tensors[bias] = (tensors[bias] - mean).astype(np.float32)
    tensors["visual_projection.weight"] = zca.astype(np.float32)
    save_safetensors(tensors, path)
    marker.write_text(marker_text)
    return folder

"""Files exported from our Flax folder load in diffusers' `StableDiffusionPipeline.load_ip_adapter`, and the
UNet output with the adapter (image encoder -> projection -> decoupled attention, CFG pair) matches ours."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from reference_models import (
    SD1_UNET,
    official_ip_adapter,
    rel_err,
    save_clip_text,
    save_clip_vision,
    save_official_ip_adapter,
    save_unet,
    save_vae,
)

from ipadapter_jax.generation.image_features import image_features, image_processor_for, pixel_values
from ipadapter_jax.ip_adapter import attach
from ipadapter_jax.models.ip_conditioning import IPConditioning
from ipadapter_jax.tiny_models import write_tiny_tokenizer
from ipadapter_jax.weights.diffusers_models import load_image_encoder, load_unet
from ipadapter_jax.weights.ip_adapter_files import convert_to_flax, convert_to_torch, load_ip_adapter

VAE = dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TEXT = dict(vocab_size=600, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=0, eos_token_id=2)
VISION = dict(image_size=32, patch_size=8, hidden_size=40, intermediate_size=37, num_hidden_layers=3,
              num_attention_heads=4, projection_dim=24, hidden_act="gelu")
ADAPTERS = {"base": dict(image_dim=24), "plus": dict(tokens=6, resampler=dict(dim=48, depth=4, heads=2,
                                                                                 embedding_dim=40))}
SCALE = 0.6
TOL = 1e-5


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory, torch):
    from diffusers import DDIMScheduler

    root = tmp_path_factory.mktemp("sd")
    save_unet(root / "unet", SD1_UNET)
    save_vae(root / "vae", VAE)
    save_clip_text(root / "text_encoder", TEXT, with_projection=False)
    write_tiny_tokenizer(root / "tokenizer")
    DDIMScheduler(steps_offset=1, clip_sample=False).save_pretrained(root / "scheduler")
    save_clip_vision(root / "adapters" / "image_encoder", VISION, seed=5)
    return root


def _pipeline(root):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(root / "vae"), text_encoder=CLIPTextModel.from_pretrained(
            root / "text_encoder"), tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(root / "unet"),
        scheduler=DDIMScheduler.from_pretrained(root / "scheduler"), safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False)


@pytest.mark.parametrize("variant,ext", [("base", ".safetensors"), ("plus", ".bin")])
def test_exported_adapter_runs_identically_in_diffusers(sd_folder, tmp_path, torch, variant, ext):
    pipe = _pipeline(sd_folder)
    state = official_ip_adapter(pipe.unet, variant, seed=7, **ADAPTERS[variant])
    src = save_official_ip_adapter(state, tmp_path / "official.bin")
    convert_to_flax(src, tmp_path / "flax", unet_config=sd_folder / "unet")
    weight_name = f"ip-adapter_{variant}{ext}"
    convert_to_torch(tmp_path / "flax", sd_folder / "adapters" / weight_name, overwrite=True)
    pipe.load_ip_adapter(str(sd_folder), subfolder="adapters", weight_name=weight_name,
                         image_encoder_folder="image_encoder")
    assert pipe.image_encoder is not None
    pipe.set_ip_adapter_scale(SCALE)

    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 52, 3), dtype=np.uint8))
    hidden = variant == "plus"
    with torch.no_grad():
        cond, uncond = pipe.encode_image(image, "cpu", 1, output_hidden_states=hidden)
    encoder = load_image_encoder(sd_folder / "adapters" / "image_encoder")
    adapter = load_ip_adapter(tmp_path / "flax")
    pixels = jnp.asarray(pixel_values(image_processor_for(sd_folder / "adapters" / "image_encoder",
                                                          encoder.image_size), [image]))
    ours_cond = image_features(encoder, pixels, adapter.spec)
    ours_uncond = image_features(encoder, pixels, adapter.spec, negative=True)
    assert rel_err(ours_cond, cond.numpy()) < TOL
    if hidden:
        assert rel_err(ours_uncond, uncond.numpy()) < TOL
    else:
        np.testing.assert_array_equal(np.asarray(ours_uncond), uncond.numpy())

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, SD1_UNET["cross_attention_dim"])).astype(np.float32)
    t = np.array([10, 700])
    with torch.no_grad():
        embeds = torch.cat([uncond, cond])[:, None]  # (B, N_img=1, ...) as the pipeline passes them
        expected = pipe.unet(torch.tensor(x), torch.tensor(t), torch.tensor(ctx),
                             added_cond_kwargs={"image_embeds": [embeds]}).sample.numpy()

    unet = load_unet(sd_folder / "unet", num_ip_adapters=1)
    attach(unet, [adapter])
    tokens = adapter.tokens(jnp.concatenate([ours_uncond, ours_cond])[:, None])
    ip = IPConditioning(tokens=(tokens,), scales=(jnp.full((unet.num_ip_layers,), SCALE),), masks=(None,))
    forward = nnx.jit(lambda m, x, t, c, ip: m(x, t, c, ip=ip))
    x_nhwc, ctx_j = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(ctx)
    got = np.asarray(forward(unet, x_nhwc, jnp.asarray(t), ctx_j, ip)).transpose(0, 3, 1, 2)
    err = rel_err(got, expected)
    print(f"{variant}: UNet with adapter vs diffusers rel err {err:.2e}")
    assert err < TOL
    pipe.set_ip_adapter_scale(0.0)
    with torch.no_grad():
        without = pipe.unet(torch.tensor(x), torch.tensor(t), torch.tensor(ctx),
                            added_cond_kwargs={"image_embeds": [embeds]}).sample.numpy()
    assert rel_err(got, without) > 1e-2  # the adapter really acts

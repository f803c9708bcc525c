"""The controls users expect, checked against diffusers where it has them: two adapters at once (base + Plus),
per-block scales in diffusers' dict form, several reference images, regional masks; and our own controls
(combine modes, negative images, the IP window, saved embeddings) for what they must do exactly."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image
from reference_models import rel_err

from ipadapter_jax.errors import UserError
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.pipelines.image_prompt import (
    ImagePrompt,
    combine_features,
    layer_scales,
    load_image_embeds,
    save_image_embeds,
)
from ipadapter_jax.pipelines.ip_adapter_pipeline import IPAdapterPipeline, Noise
from ipadapter_jax.tiny_models import (
    TINY_UNET,
    TINY_UNET_XL,
    write_tiny_image_encoder,
    write_tiny_ip_adapter,
    write_tiny_pipeline,
)

STEPS = 3


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("controls")
    base = write_tiny_pipeline(root / "sdxl", "sdxl")
    adapters = root / "adapters"
    encoder = write_tiny_image_encoder(adapters / "image_encoder")
    write_tiny_ip_adapter(adapters / "base.safetensors", base, encoder, seed=3)
    write_tiny_ip_adapter(adapters / "plus.safetensors", base, encoder, variant="plus", seed=4)
    refs = []
    for i in range(3):
        path = root / f"ref{i}.png"
        Image.fromarray((np.random.default_rng(i).random((36, 44, 3)) * 255).astype(np.uint8)).save(path)
        refs.append(path)
    pipe = IPAdapterPipeline.from_pretrained(base, image_encoder=encoder,
                                             adapters=[adapters / "base.safetensors", adapters / "plus.safetensors"])
    return base, adapters, refs, pipe


def _diffusers(torch, base, adapters):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(base, low_cpu_mem_usage=False)
        pipe.load_ip_adapter(str(adapters), subfolder="", weight_name=["base.safetensors", "plus.safetensors"],
                             image_encoder_folder="image_encoder", low_cpu_mem_usage=False)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(paths):
    return [Image.open(p).convert("RGB") for p in paths]


def _masks(size=64):
    left, right = np.zeros((size, size), np.uint8), np.zeros((size, size), np.uint8)
    left[:, : size // 2], right[:, size // 2 :] = 255, 255
    return [Image.fromarray(left), Image.fromarray(right)]


def test_two_adapters_block_scales_and_several_images_match_diffusers(torch, sdxl):
    base, adapters, refs, pipe = sdxl
    block_scale = {"down": {"block_1": 1.2}, "up": {"block_0": [0.8, 0.0]}, "mid": 0.5}
    noise = Noise.from_seeds([7], (16, 16, 4))
    ours = pipe("a scene", images=[ImagePrompt(images=refs[:1], scale=block_scale),
                                   ImagePrompt(images=refs[1:], scale=0.6)],
                scheduler="ddim", num_inference_steps=STEPS, guidance_scale=5.0, height=64, width=64,
                noise=noise, output_type="latent").latents
    ref = _diffusers(torch, base, adapters)
    ref.set_ip_adapter_scale([block_scale, 0.6])
    with torch.no_grad():
        expected = ref("a scene", ip_adapter_image=[_images(refs[:1])[0], _images(refs[1:])],
                       num_inference_steps=STEPS, guidance_scale=5.0, height=64, width=64, output_type="latent",
                       latents=torch.from_numpy(noise.latents.transpose(0, 3, 1, 2).copy())).images.numpy()
    assert rel_err(ours, expected) < 1e-4


def test_regional_masks_match_diffusers(torch, sdxl):
    from diffusers.image_processor import IPAdapterMaskProcessor

    base, adapters, refs, pipe = sdxl
    noise = Noise.from_seeds([8], (16, 16, 4))
    masks = _masks()
    ours = pipe("two halves", images=[ImagePrompt(images=refs[:2], masks=masks, scale=[0.9, 0.4]),
                                      ImagePrompt(images=refs[2:], scale=0.3)],
                scheduler="ddim", num_inference_steps=STEPS, guidance_scale=5.0, height=64, width=64,
                noise=noise, output_type="latent").latents
    ref = _diffusers(torch, base, adapters)
    ref.set_ip_adapter_scale([[0.9, 0.4], 0.3])
    processed = IPAdapterMaskProcessor().preprocess(masks, height=64, width=64)
    with torch.no_grad():
        expected = ref("two halves", ip_adapter_image=[_images(refs[:2]), _images(refs[2:])],
                       cross_attention_kwargs={"ip_adapter_masks": [processed.reshape(1, 2, 64, 64), None]},
                       num_inference_steps=STEPS, guidance_scale=5.0, height=64, width=64, output_type="latent",
                       latents=torch.from_numpy(noise.latents.transpose(0, 3, 1, 2).copy())).images.numpy()
    assert rel_err(ours, expected) < 1e-4


def _latents(pipe, prompts, **kw):
    return pipe("a scene", images=prompts, num_inference_steps=STEPS, guidance_scale=5.0, height=64, width=64,
                seed=11, output_type="latent", **kw).latents


def test_ip_window_and_zero_scale(sdxl):
    _, _, refs, pipe = sdxl
    prompts = [ImagePrompt(images=refs[:1]), ImagePrompt(images=refs[1:2])]
    zero = [ImagePrompt(images=refs[:1], scale=0.0), ImagePrompt(images=refs[1:2], scale=0.0)]
    full = _latents(pipe, prompts)
    np.testing.assert_array_equal(_latents(pipe, prompts, ip_window=(0.0, 1.0)), full)
    np.testing.assert_array_equal(_latents(pipe, prompts, ip_window=(0.0, 0.0)), _latents(pipe, zero))
    late = _latents(pipe, prompts, ip_window=(0.5, 1.0))
    assert rel_err(late, full) > 1e-3 and rel_err(late, _latents(pipe, zero)) > 1e-3


def test_negative_image_and_saved_embeddings(sdxl, tmp_path):
    _, _, refs, pipe = sdxl
    prompts = [ImagePrompt(images=refs[:1]), ImagePrompt(images=refs[1:2])]
    default = _latents(pipe, prompts)
    custom = [ImagePrompt(images=refs[:1], negative_images=refs[2:]), ImagePrompt(images=refs[1:2])]
    assert rel_err(_latents(pipe, custom), default) > 1e-3
    embeds = pipe.image_embeds(prompts)
    specs = [a.spec for a in pipe.adapters]
    # the official negative branch: zero embeddings for the base adapter, the encoder on a zero image for Plus
    assert not embeds[0][0].any() and embeds[1][0].std() > 0
    path = save_image_embeds(tmp_path / "embeds.npz", embeds, specs)
    reloaded = load_image_embeds(path, specs)
    np.testing.assert_array_equal(_latents(pipe, [ImagePrompt(), ImagePrompt()], embeds=reloaded), default)
    with pytest.raises(UserError, match="saved for a base adapter in slot 0, but a plus adapter"):
        load_image_embeds(path, specs[::-1])


def test_combine_modes():
    x = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]], np.float32)
    np.testing.assert_allclose(combine_features(x, "average"), [[4 / 3, 2.0]])
    np.testing.assert_allclose(combine_features(x, "add"), [[4.0, 6.0]])
    np.testing.assert_allclose(combine_features(x, "subtract"), [[1 - 1.5, 0 - 3.0]])
    # the norm over the images, per feature (the reference's definition): columns [1, 0, 3] and [0, 2, 4]
    np.testing.assert_allclose(combine_features(x, "norm_average"), [[4 / np.sqrt(10) / 3, 6 / np.sqrt(20) / 3]],
                               rtol=1e-6)
    np.testing.assert_allclose(combine_features(x, "max"), [[3.0, 4.0]])
    np.testing.assert_allclose(combine_features(x, "min"), [[0.0, 0.0]])
    np.testing.assert_array_equal(combine_features(x, "concat"), x)


def test_scale_forms():
    sd15 = UNetConfig.from_dict(TINY_UNET)
    xl = UNetConfig.from_dict(TINY_UNET_XL)
    n = len(xl.cross_attention_layers())
    np.testing.assert_array_equal(layer_scales(0.7, xl), np.full(n, 0.7, np.float32))
    per_layer = np.linspace(0, 1, n)
    np.testing.assert_allclose(layer_scales(list(per_layer), xl), per_layer, rtol=1e-6)
    expanded = layer_scales({"up": {"block_0": [0.0, 1.0]}}, xl)
    paths = [layer.path for layer in xl.cross_attention_layers()]
    expected = [1.0 if p.startswith("up_blocks.0.attentions.1.") else 0.0 for p in paths]
    np.testing.assert_array_equal(expanded, np.asarray(expected, np.float32))
    with pytest.raises(UserError, match="block_3"):
        layer_scales({"down": {"block_3": 1.0}}, xl)
    with pytest.raises(UserError, match="SDXL-shaped"):
        layer_scales("style", sd15)
    with pytest.raises(UserError, match="one value per cross-attention layer"):
        layer_scales([1.0, 2.0], xl)

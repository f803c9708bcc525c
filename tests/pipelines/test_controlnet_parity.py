"""End-to-end parity of ControlNets, LoRAs and LCM sampling with diffusers' PyTorch pipelines on tiny random
checkpoints written to disk in the real formats: same prompts, reference and control images, initial noise and
VAE posterior noise; final latents within 1e-4 relative (float32). Each diffusers run checks several features at
once to keep the suite short."""

from __future__ import annotations

import importlib
import warnings

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from PIL import Image
from reference_models import NoiseQueue, rel_err

from ipadapter_jax.generation import stages
from ipadapter_jax.generation.denoise import step_noise
from ipadapter_jax.pipelines.ip_adapter_pipeline import IPAdapterPipeline, Noise
from ipadapter_jax.tiny_models import (
    write_tiny_controlnet,
    write_tiny_image_encoder,
    write_tiny_ip_adapter,
    write_tiny_lora,
    write_tiny_pipeline,
)
from ipadapter_jax.weights.diffusers_models import load_text_encoder, load_unet

TOL = 1e-4
SHAPE = (16, 16, 4)  # latents of the 64x64 tiny pipelines


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet")
    adapters = root / "adapters"
    encoder = write_tiny_image_encoder(adapters / "image_encoder")
    out = {"root": root, "adapters": adapters, "encoder": encoder}
    for name, kind, channels in (("sd15", "sd15", 4), ("sd15_inpaint", "sd15", 9), ("sdxl", "sdxl", 4)):
        out[name] = write_tiny_pipeline(root / name, kind, in_channels=channels)
        write_tiny_ip_adapter(adapters / f"{name}.safetensors", out[name], encoder)
    out["cn_a"] = write_tiny_controlnet(root / "cn_a", out["sd15"], seed=4)
    out["cn_b"] = write_tiny_controlnet(root / "cn_b", out["sd15"], seed=7)
    out["cn_xl"] = write_tiny_controlnet(root / "cn_xl", out["sdxl"], seed=5)
    return out


def _image(seed, size):
    return Image.fromarray((np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8))


def _ours(tiny, name, **kwargs):
    one = Mesh(np.asarray(jax.devices()[:1]), ("data",))  # one device: the tiny batches run fastest unsplit
    return IPAdapterPipeline.from_pretrained(tiny[name], image_encoder=tiny["encoder"],
                                             adapters=[tiny["adapters"] / f"{name}.safetensors"], mesh=one, **kwargs)


def _reference(torch, cls_name, tiny, name, controlnets=(), loras=(), scheduler=None):
    import diffusers

    cls = getattr(diffusers, cls_name)
    extra = {}
    if controlnets:
        nets = [diffusers.ControlNetModel.from_pretrained(tiny[c]) for c in controlnets]
        extra["controlnet"] = nets[0] if len(nets) == 1 else nets
    if "XL" not in cls_name:
        extra.update(safety_checker=None, requires_safety_checker=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = cls.from_pretrained(tiny[name], low_cpu_mem_usage=False, **extra)
        for path, weight in loras:  # fused one at a time, then the PEFT wrappers dropped
            pipe.load_lora_weights(str(path))
            pipe.fuse_lora(lora_scale=weight)
            pipe.unload_lora_weights()
        pipe.load_ip_adapter(str(tiny["adapters"]), subfolder="", weight_name=f"{name}.safetensors",
                             image_encoder_folder="image_encoder", low_cpu_mem_usage=False)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(torch, pipe, **kwargs):
    with torch.no_grad():
        return pipe(output_type="latent", **kwargs).images.float().numpy()


def _nchw(array):
    return np.ascontiguousarray(np.asarray(array).transpose(0, 3, 1, 2))


def _check(name, got, expected):
    assert got.shape == expected.shape
    err = rel_err(got, expected)
    print(f"{name}: relative error {err:.2e}")
    assert err < TOL, f"{name}: relative error {err:.2e}"
    return err


def test_two_controlnets_with_ip_adapter_match_diffusers_and_never_recompile(tiny, torch):
    """SD1.5 text-to-image, IP-Adapter, two ControlNets with their own scales and windows (PNDM: five UNet calls
    for four steps, so the windows are cut in fifths as diffusers cuts them); control images of another size are
    resized to the output. New scales and windows reuse the compiled loop."""
    noise = Noise.from_seeds([3, 4], SHAPE)
    ref, controls = _image(0, (40, 48)), [_image(1, (80, 72)), _image(2, (64, 64))]
    common = dict(num_inference_steps=4, guidance_scale=6.0, height=64, width=64)
    windows = dict(control_scale=[0.6, 1.3], control_start=[0.0, 0.25], control_end=[0.5, 1.0])
    ours = _ours(tiny, "sd15", controlnets=[tiny["cn_a"], tiny["cn_b"]])
    call = dict(images=[ref], negative_prompt="blurry", noise=noise, output_type="latent", scale=0.7,
                control_image=controls, **common)
    got = ours(["a red square", "a blue circle"], **call, **windows).latents
    compiled = stages.run_denoise._cache_size()
    other = ours(["a red square", "a blue circle"], **call, control_scale=[1.1, 0.2], control_start=0.4,
                 control_end=0.9).latents
    assert stages.run_denoise._cache_size() == compiled  # traced scales and keep-table: no recompilation
    assert rel_err(other, got) > 1e-3

    pipe = _reference(torch, "StableDiffusionControlNetPipeline", tiny, "sd15", controlnets=["cn_a", "cn_b"])
    pipe.set_ip_adapter_scale(0.7)
    expected = _run(torch, pipe, prompt=["a red square", "a blue circle"], negative_prompt=["blurry"] * 2,
                    ip_adapter_image=ref, image=controls, controlnet_conditioning_scale=[0.6, 1.3],
                    control_guidance_start=[0.0, 0.25], control_guidance_end=[0.5, 1.0],
                    latents=torch.from_numpy(_nchw(noise.latents)), **common)
    _check("two ControlNets", got, expected)
    without = ours(["a red square", "a blue circle"], **call, control_scale=0.0).latents
    assert rel_err(without, expected) > 1e-2  # the ControlNets really steer
    empty = ours(["a red square", "a blue circle"], **call, control_start=0.5, control_end=0.5).latents
    np.testing.assert_array_equal(empty, without)  # an empty window is a zero scale
    assert stages.run_denoise._cache_size() == compiled


def test_controlnet_inpainting_on_a_nine_channel_unet_matches_diffusers(tiny, torch, monkeypatch):
    """The ControlNet reads the 4 latent channels (not the mask concat); strength 0.75 leaves three of four
    steps, over which the window [0, 0.6] keeps the first one."""
    import diffusers.models.autoencoders.vae as vae_module

    noise = Noise.from_seeds([5], SHAPE)
    ref, control, init = _image(0, (40, 48)), _image(4, (64, 64)), _image(5, (64, 64))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    mask = Image.fromarray(mask)
    common = dict(num_inference_steps=4, guidance_scale=6.0, height=64, width=64, strength=0.75)
    ours = _ours(tiny, "sd15_inpaint", controlnets=[tiny["cn_a"]])
    got = ours("a dog", images=[ref], negative_prompt="blurry", noise=noise, output_type="latent",
               init_image=init, mask_image=mask, control_image=control, control_scale=0.9, control_end=0.6,
               scheduler="ddim", **common).latents

    pipe = _reference(torch, "StableDiffusionControlNetInpaintPipeline", tiny, "sd15_inpaint", controlnets=["cn_a"],
                      scheduler="DDIMScheduler")
    queue = NoiseQueue(torch, [noise.image, noise.latents, noise.masked])
    monkeypatch.setattr(vae_module, "randn_tensor", queue)
    monkeypatch.setattr(importlib.import_module(type(pipe).__module__), "randn_tensor", queue)
    expected = _run(torch, pipe, prompt="a dog", negative_prompt="blurry", ip_adapter_image=ref, image=init,
                    mask_image=mask, control_image=control, controlnet_conditioning_scale=0.9,
                    control_guidance_end=0.6, **common)
    assert not queue.arrays
    _check("ControlNet inpainting", got, expected)


def test_sdxl_controlnet_in_guess_mode_with_ip_adapter_matches_diffusers(tiny, torch):
    """SDXL: the ControlNet gets the pooled text and time ids as the UNet does; in guess mode it sees only the
    conditional rows (text, pooled, time ids) and ramps its residuals, and the unconditional rows get none."""
    noise = Noise.from_seeds([6, 7], SHAPE)
    ref, control = _image(0, (40, 48)), _image(6, (64, 64))
    common = dict(num_inference_steps=3, guidance_scale=5.0, height=64, width=64)
    ours = _ours(tiny, "sdxl", controlnets=[tiny["cn_xl"]])
    got = ours(["a castle", "a lake"], images=[ref], negative_prompt="fog", noise=noise, output_type="latent",
               control_image=control, control_scale=0.8, control_start=0.2, guess_mode=True, **common).latents
    pipe = _reference(torch, "StableDiffusionXLControlNetPipeline", tiny, "sdxl", controlnets=["cn_xl"])
    expected = _run(torch, pipe, prompt=["a castle", "a lake"], negative_prompt=["fog"] * 2, ip_adapter_image=ref,
                    image=control, controlnet_conditioning_scale=0.8, control_guidance_start=0.2, guess_mode=True,
                    latents=torch.from_numpy(_nchw(noise.latents)), **common)
    _check("SDXL ControlNet, guess mode", got, expected)


def test_kohya_and_diffusers_loras_with_lcm_match_diffusers(tiny, torch, monkeypatch):
    """A kohya file (UNet and text encoder, one alpha) and a diffusers/PEFT file fused at load, as diffusers'
    load_lora_weights + fuse_lora; then four LCM steps without CFG, the LCM-LoRA recipe, with the IP-Adapter.
    LCM re-noises between steps: diffusers gets our per-step noise."""
    pytest.importorskip("peft")
    import diffusers.schedulers.scheduling_lcm as lcm_module

    root = tiny["root"]
    kohya = write_tiny_lora(root / "kohya.safetensors", tiny["sd15"], style="kohya", alpha=2.0, seed=11)
    peft = write_tiny_lora(root / "peft.safetensors", tiny["sd15"], style="peft", seed=12)
    loras = [(kohya, 0.8), (peft, 0.5)]
    noise = Noise.from_seeds([9, 10], SHAPE)
    ref = _image(0, (40, 48))
    common = dict(num_inference_steps=4, guidance_scale=1.0, height=64, width=64)
    ours = _ours(tiny, "sd15", loras=loras)
    got = ours(["a tree", "a boat"], images=[ref], noise=noise, output_type="latent", scheduler="lcm",
               **common).latents
    fused = ours.base
    base_unet, base_text = load_unet(tiny["sd15"] / "unet"), load_text_encoder(tiny["sd15"] / "text_encoder")
    for a, b in ((fused.unet.conv_in.kernel, base_unet.conv_in.kernel),  # both models adapted
                 (fused.text_encoders[0].text_model.encoder.layers[0].self_attn.q_proj.kernel,
                  base_text.text_model.encoder.layers[0].self_attn.q_proj.kernel)):
        assert rel_err(a[...], b[...]) > 1e-2

    pipe = _reference(torch, "StableDiffusionPipeline", tiny, "sd15", loras=loras, scheduler="LCMScheduler")
    queue = NoiseQueue(torch, [step_noise(noise.keys, i, SHAPE) for i in range(3)])
    monkeypatch.setattr(lcm_module, "randn_tensor", queue)
    expected = _run(torch, pipe, prompt=["a tree", "a boat"], ip_adapter_image=ref,
                    latents=torch.from_numpy(_nchw(noise.latents)), **common)
    assert not queue.arrays  # three re-noisings for four steps
    _check("LoRAs + LCM", got, expected)


def test_faceid_lora_and_base_loras_add_up(tiny):
    """A FaceID adapter's own LoRA is merged beside the fused LoRA files: each changes the kernels by its own
    delta, whichever else is loaded."""
    lora = write_tiny_lora(tiny["root"] / "style.safetensors", tiny["sd15"], style="peft", seed=13)
    faceid = write_tiny_ip_adapter(tiny["root"] / "faceid.bin", tiny["sd15"], tiny["encoder"], variant="faceid")

    def to_q(unet):
        return np.asarray(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.kernel[...])

    def kernel(**kwargs):
        one = Mesh(np.asarray(jax.devices()[:1]), ("data",))
        return to_q(IPAdapterPipeline.from_pretrained(tiny["sd15"], mesh=one, **kwargs).base.unet)

    base = to_q(load_unet(tiny["sd15"] / "unet"))
    both, face_only = kernel(adapters=[faceid], loras=[(lora, 0.6)]), kernel(adapters=[faceid])
    lora_only = kernel(loras=[(lora, 0.6)])
    assert rel_err(face_only, base) > 1e-3 and rel_err(lora_only, base) > 1e-3
    np.testing.assert_allclose(both - face_only, lora_only - base, rtol=0, atol=1e-6 * np.abs(base).max())

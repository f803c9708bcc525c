"""End-to-end parity with diffusers' PyTorch IP-Adapter pipelines on tiny random checkpoints written to disk:
same prompt, reference image, initial noise and VAE posterior noise; final latents within 1e-4 relative."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image
from reference_models import NoiseQueue, rel_err

from ipadapter_jax.pipelines.ip_adapter_pipeline import IPAdapterPipeline, Noise
from ipadapter_jax.tiny_models import (
    write_tiny_image_encoder,
    write_tiny_ip_adapter,
    write_tiny_pipeline,
)

STEPS = 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for name, kind, channels in (("sd15", "sd15", 4), ("sd15_inpaint", "sd15", 9), ("sdxl", "sdxl", 4)):
        base = write_tiny_pipeline(root / name, kind, in_channels=channels)
        adapters = root / f"{name}_adapter"
        write_tiny_image_encoder(adapters / "image_encoder")
        write_tiny_ip_adapter(adapters / "ip-adapter.safetensors", base, adapters / "image_encoder")
        out[name] = (base, adapters)
    return out


def _reference_image(seed=0, size=(40, 48)):
    return Image.fromarray((np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8))


def _mask(size=64):
    m = np.zeros((size, size), np.uint8)
    m[16:48, 8:40] = 255
    return Image.fromarray(m)


def _torch_pipeline(torch, kind, mode, base, adapters, scheduler):
    import diffusers

    cls = {
        ("sd15", "t2i"): diffusers.StableDiffusionPipeline, ("sd15", "i2i"): diffusers.StableDiffusionImg2ImgPipeline,
        ("sd15", "inpaint"): diffusers.StableDiffusionInpaintPipeline,
        ("sdxl", "t2i"): diffusers.StableDiffusionXLPipeline,
        ("sdxl", "i2i"): diffusers.StableDiffusionXLImg2ImgPipeline,
        ("sdxl", "inpaint"): diffusers.StableDiffusionXLInpaintPipeline,
    }[(kind, mode)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = cls.from_pretrained(base, low_cpu_mem_usage=False, safety_checker=None, requires_safety_checker=False)
        pipe.load_ip_adapter(str(adapters), subfolder="", weight_name="ip-adapter.safetensors",
                             image_encoder_folder="image_encoder", low_cpu_mem_usage=False)
    sched_cls = {"ddim": diffusers.DDIMScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
                 "euler": diffusers.EulerDiscreteScheduler}[scheduler]
    pipe.scheduler = sched_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = [
    # kind, folder, mode, scheduler, strength
    ("sd15", "sd15", "t2i", "ddim", None),
    ("sd15", "sd15", "t2i", "dpmpp_2m", None),
    ("sd15", "sd15", "i2i", "ddim", 0.6),
    ("sd15", "sd15", "inpaint", "dpmpp_2m", 0.8),
    ("sd15", "sd15_inpaint", "inpaint", "ddim", 1.0),
    ("sdxl", "sdxl", "t2i", "dpmpp_2m", None),
    ("sdxl", "sdxl", "i2i", "ddim", 0.6),
    ("sdxl", "sdxl", "inpaint", "euler", 1.0),
]


@pytest.mark.parametrize("kind,folder,mode,scheduler,strength", CASES,
                         ids=[f"{c[1]}-{c[2]}-{c[3]}" for c in CASES])
def test_final_latents_match_diffusers(torch, monkeypatch, folders, kind, folder, mode, scheduler, strength):
    import diffusers.models.autoencoders.vae as vae_module

    base, adapters = folders[folder]
    batch, shape = 2, (16, 16, 4)
    noise = Noise.from_seeds([3, 4], shape)
    # diffusers encodes the one init (or masked) image once and repeats its latents over the batch
    noise.image[1], noise.masked[1] = noise.image[0], noise.masked[0]
    ref = _reference_image()
    init = _reference_image(5, (64, 64)) if mode != "t2i" else None
    mask = _mask() if mode == "inpaint" else None
    common = dict(num_inference_steps=STEPS, guidance_scale=6.0, height=64, width=64)

    ours = IPAdapterPipeline.from_pretrained(base, image_encoder=adapters / "image_encoder",
                                             adapters=[adapters / "ip-adapter.safetensors"])
    got = ours(["a red square", "a blue circle"], images=[ref], negative_prompt="blurry", scheduler=scheduler,
               init_image=init, mask_image=mask, strength=strength, noise=noise, output_type="latent",
               scale=0.7, **common).latents

    pipe = _torch_pipeline(torch, kind, mode, base, adapters, scheduler)
    pipe.set_ip_adapter_scale(0.7)
    kwargs = dict(prompt=["a red square", "a blue circle"], negative_prompt=["blurry"] * 2, ip_adapter_image=ref,
                  output_type="latent", **common)
    if mode == "t2i":
        kwargs["latents"] = torch.from_numpy(noise.latents.transpose(0, 3, 1, 2).copy())
    else:
        nine = pipe.unet.config.in_channels == 9
        order = {"i2i": [noise.image[:1], noise.latents],
                 "inpaint": ([noise.latents, noise.masked[:1]] if nine and strength == 1.0
                             else [noise.image[:1], noise.latents, noise.masked[:1]])}[mode]
        queue = NoiseQueue(torch, order)
        monkeypatch.setattr(vae_module, "randn_tensor", queue)
        monkeypatch.setattr(type(pipe).__module__ and __import__(type(pipe).__module__, fromlist=["x"]),
                            "randn_tensor", queue)
        kwargs.update(image=init, strength=strength)
        if mode == "inpaint":
            kwargs["mask_image"] = mask
    with torch.no_grad():
        expected = pipe(**kwargs).images.float().numpy()
    assert got.shape == expected.shape == (batch, 4, 16, 16)
    err = rel_err(got, expected)
    print(f"{folder} {mode} {scheduler}: relative error {err:.2e}")
    assert err < 1e-4

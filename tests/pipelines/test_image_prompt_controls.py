"""The image-prompt controls through the pipeline, the batch manifest and the CLI on tiny models: linear weights
with V scaling are today's output bit for bit; "style transfer" is the InstantStyle `style` preset; switching
weight types, embeds scaling, precise swaps or a composition image never recompiles the denoising loop; tiles and
negative noise are the masked / negative image prompts they stand for; a batch of four weight types gives each
item its single-call image; bad values are one sentence."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from controls_reference import reference_tiles
from jax.sharding import Mesh
from PIL import Image

from ipadapter_jax.cli import main
from ipadapter_jax.errors import UserError
from ipadapter_jax.generation import stages
from ipadapter_jax.pipelines.batch import run_batch
from ipadapter_jax.pipelines.image_prompt import ImagePrompt
from ipadapter_jax.pipelines.ip_adapter_pipeline import GenerationOutput, IPAdapterPipeline
from ipadapter_jax.pipelines.negative_noise import negative_noise_image
from ipadapter_jax.pipelines.weight_types import composition_layers
from ipadapter_jax.tiny_models import write_tiny_image_encoder, write_tiny_ip_adapter, write_tiny_pipeline

STEPS = 2


def _write(root, kind: str, full_layout: bool):
    base = write_tiny_pipeline(root / "base", kind, full_layout=full_layout)
    encoder = write_tiny_image_encoder(root / "encoder")
    adapter = write_tiny_ip_adapter(root / "ip.safetensors", base, encoder, seed=5)
    return base, encoder, adapter


def _single_device(base, encoder, adapter):
    return IPAdapterPipeline.from_pretrained(base, image_encoder=encoder, adapters=[adapter],
                                             mesh=Mesh(np.asarray(jax.devices()[:1]), ("data",)))


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    root = tmp_path_factory.mktemp("refs")
    out = []
    for i, size in enumerate([(40, 48), (36, 36), (120, 400)]):
        path = root / f"ref{i}.png"
        Image.fromarray((np.random.default_rng(i).random((*size, 3)) * 255).astype(np.uint8)).save(path)
        out.append(path)
    return out


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """An SDXL-layout tiny pipeline (11 attention blocks, the deeper ones with two transformer layers)."""
    models = _write(tmp_path_factory.mktemp("sdxl"), "sdxl", full_layout=True)
    return models, _single_device(*models)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    models = _write(tmp_path_factory.mktemp("sd15"), "sd15", full_layout=False)
    return models, _single_device(*models)


def _latents(pipe, prompt: ImagePrompt, **kw):
    return pipe("a scene", images=[prompt], num_inference_steps=STEPS, guidance_scale=5.0, height=64, width=64,
                seed=11, output_type="latent", **kw).latents


def _without_controls(monkeypatch):
    """Run the denoising loop with the plain image branch (no LayerControls): the code path of before."""
    run = stages.run_denoise

    def plain(graphdef, state, scheduler, plan, latents, cond, *rest):
        cond = dataclasses.replace(cond, ip=dataclasses.replace(cond.ip, controls=None))
        return run(graphdef, state, scheduler, plan, latents, cond, *rest)

    monkeypatch.setattr(stages, "run_denoise", plain)


def test_linear_with_v_scaling_is_todays_output_bit_for_bit(sd15, refs, monkeypatch):
    _, pipe = sd15
    prompts = [ImagePrompt(images=refs[:1], scale=0.7),
               ImagePrompt(images=refs[:2], scale=[0.9, 0.4], masks=[np.eye(64), 1 - np.eye(64)])]
    ours = [_latents(pipe, p) for p in prompts]
    _without_controls(monkeypatch)
    for prompt, latents in zip(prompts, ours, strict=True):
        np.testing.assert_array_equal(latents, _latents(pipe, prompt))


def test_negative_noise_is_the_negative_image_it_makes(sd15, refs):
    _, pipe = sd15
    source = np.asarray(Image.open(refs[1]).convert("RGB"), np.float32) / 255
    noised = _latents(pipe, ImagePrompt(images=refs[:1], negative_images=refs[1:2], negative_noise="shuffle:0.6"))
    image = (negative_noise_image("shuffle", 0.6, source) * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(noised, _latents(pipe, ImagePrompt(images=refs[:1], negative_images=[image])))
    black = _latents(pipe, ImagePrompt(images=refs[:1], negative_noise="fade"))
    assert not np.array_equal(black, noised) and not np.array_equal(black, _latents(pipe, ImagePrompt(images=refs[:1])))


def test_tiles_are_masked_tile_prompts(sd15, refs):
    _, pipe = sd15
    wide = Image.open(refs[2]).convert("RGB")  # 400 x 120: four overlapping tiles
    (width, height), corners = reference_tiles(*wide.size)
    resized = np.asarray(wide.resize((width, height), resample=Image.LANCZOS))
    crops, masks = [], []
    for left, top in corners:
        crops.append(resized[top:top + 256, left:left + 256])
        mask = np.zeros((height, width), np.float32)
        mask[top:top + 256, left:left + 256] = 1
        masks.append(mask)
    expected = _latents(pipe, ImagePrompt(images=crops, masks=masks, scale=0.8))
    np.testing.assert_array_equal(_latents(pipe, ImagePrompt(images=[wide], tiles="auto", scale=0.8)), expected)


def test_style_transfer_is_the_style_preset(sdxl, refs):
    _, pipe = sdxl
    styled = _latents(pipe, ImagePrompt(images=refs[:1], weight_type="style transfer", scale=0.6))
    np.testing.assert_array_equal(styled, _latents(pipe, ImagePrompt(images=refs[:1], scale={"up": {"block_0": [
        0.0, 0.6, 0.0]}})))
    np.testing.assert_array_equal(_latents(pipe, ImagePrompt(images=refs[:1], weight_type="style_transfer")),
                                  _latents(pipe, ImagePrompt(images=refs[:1], scale="style")))


def test_switching_controls_never_recompiles(sdxl, refs):
    _, pipe = sdxl
    first = _latents(pipe, ImagePrompt(images=refs[:1], scale=0.6))
    compiled = stages.run_denoise._cache_size()
    variants = [dict(weight_type="ease in-out"), dict(weight_type="style transfer precise"),
                dict(weight_type="composition precise", embeds_scaling="kv-mean-penalty"),
                dict(embeds_scaling="kv"), dict(embeds_scaling="kv-penalty", layer_weights="3:1,6:0.5"),
                dict(weight_type="style and composition", composition_images=refs[1:2], composition_weight=0.4),
                dict(negative_noise="gaussian:0.5")]
    seen = [first]
    for options in variants:
        latents = _latents(pipe, ImagePrompt(images=refs[:1], scale=0.6, **options))  # kv at 1 would be v
        assert all(not np.array_equal(latents, other) for other in seen), options
        seen.append(latents)
    assert stages.run_denoise._cache_size() == compiled


def test_composition_image_tokens_replace_the_conditional_ones_on_the_composition_block(sdxl, refs):
    _, pipe = sdxl
    prompt = ImagePrompt(images=refs[:1], weight_type="style and composition", composition_images=refs[1:2])
    negative, positive = pipe._ip_conditioning([prompt], 1, 64, 64, None)
    config = pipe.base.unet.config
    np.testing.assert_array_equal(positive.controls[0].use_alt, composition_layers(config))
    comp_tokens = pipe.image_tokens([ImagePrompt(images=refs[1:2])])[0][1]
    np.testing.assert_array_equal(positive.controls[0].alt_tokens, comp_tokens)
    np.testing.assert_array_equal(negative.controls[0].alt_tokens, negative.tokens[0])  # uncond unchanged
    precise = ImagePrompt(images=refs[:1], weight_type="style transfer precise")
    negative, positive = pipe._ip_conditioning([precise], 1, 64, 64, None)
    np.testing.assert_array_equal(negative.controls[0].alt_tokens, positive.tokens[0])  # uncond takes cond
    assert not np.asarray(positive.controls[0].alt_tokens).any()  # cond takes zero tokens


def test_a_batch_of_four_weight_types_gives_each_item_its_single_call_image(sdxl, refs, tmp_path):
    (base, encoder, adapter), pipe = sdxl
    kinds = [("style transfer precise", "v"), ("ease in", "kv-mean-penalty"), ("composition", "kv"),
             ("linear", "v")]
    items = [{"id": f"item{i}", "prompt": "a scene", "images": str(refs[0]), "seed": 20 + i, "scale": 0.5 + 0.25 * i,
              "weight_type": kind, "embeds_scaling": scaling, "steps": STEPS, "guidance": 5.0}
             for i, (kind, scaling) in enumerate(kinds)]
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("\n".join(json.dumps(i) for i in items))
    eight = IPAdapterPipeline.from_pretrained(base, image_encoder=encoder, adapters=[adapter])
    assert eight.mesh.size == 8  # one item per device, as the batch runner promises: no dependence on the batch
    report = run_batch(eight, manifest, tmp_path / "out", batch_size=4, progress=False)
    assert sorted(report.written) == [i["id"] for i in items] and not report.failed
    for item in items:
        single = pipe("a scene", images=[ImagePrompt(images=refs[:1], scale=item["scale"],
                                                     weight_type=item["weight_type"],
                                                     embeds_scaling=item["embeds_scaling"])],
                      num_inference_steps=STEPS, guidance_scale=5.0, seed=item["seed"], output_type="np").images[0]
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / f"{item['id']}.png")), single)
    assert json.loads((tmp_path / "out" / "item0.json").read_text())["weight_type"] == "style transfer precise"


def test_cli_flags_reach_the_image_prompt(sdxl, refs, tmp_path, monkeypatch):
    (base, encoder, adapter), _ = sdxl
    calls = []

    def record(pipe, prompt, *, images, **kwargs):  # the CLI only parses: check what it hands the pipeline
        calls.append(images)
        return GenerationOutput(images=[], latents=np.zeros((1, 4, 16, 16), np.float32), timings={})

    monkeypatch.setattr(IPAdapterPipeline, "__call__", record)
    flags = ["--weight-type", "style_and_composition", "--composition-image", str(refs[1]), "--composition-weight",
             "0.4", "--embeds-scaling", "kv-mean-penalty", "--negative-noise", "dissolve:0.4", "--scale", "0.7"]
    args = ["generate", "--base", str(base), "--image-encoder", str(encoder), "--adapter", str(adapter), "--image",
            str(refs[0]), "--output-type", "latent", "--out", str(tmp_path / "cli.npy"), "--overwrite"]
    assert main([*args, *flags]) == 0
    (prompt,) = calls[0]
    assert (prompt.weight_type, prompt.composition_images, prompt.composition_weight, prompt.embeds_scaling,
            prompt.negative_noise, prompt.scale, prompt.layer_weights, prompt.tiles) == (
        "style and composition", [str(refs[1])], 0.4, "kv-mean-penalty", "dissolve:0.4", 0.7, None, None)
    assert main([*args, "--layer-weights", "3:1,6:0.5", "--tiles", "auto", "--combine", "concat"]) == 0
    (prompt,) = calls[1]
    assert prompt.layer_weights == "3:1,6:0.5" and prompt.weight_type == "linear" and len(prompt.images) == 1
    assert main([*args, "--image", str(refs[2]), "--combine", "max"]) == 0
    assert calls[2][0].combine == "max" and len(calls[2][0].images) == 2


@pytest.mark.parametrize("flags,expected", [
    (["--weight-type", "stlye transfer"], "weight type 'stlye transfer' is unknown; use one of: linear, ease in"),
    (["--layer-weights", "2:1,16:0.5"], "layer weights name block 16, but this UNet's attention blocks are "
                                        "numbered 0 to 15."),
    (["--weight-type", "style and composition", "--composition-image", "{ref}"],
     "a composition image works on SDXL-shaped UNets only"),
])
def test_bad_control_values_are_one_sentence(tmp_path_factory, refs, capsys, flags, expected):
    root = tmp_path_factory.getbasetemp() / "sd15-layout"
    if not (root / "ip.safetensors").exists():
        _write(root, "sd15", full_layout=True)
    base, encoder, adapter = root / "base", root / "encoder", root / "ip.safetensors"
    flags = [f.format(ref=refs[1]) for f in flags]
    code = main(["generate", "--base", str(base), "--image-encoder", str(encoder), "--adapter", str(adapter),
                 "--image", str(refs[0]), "--steps", "1", *flags, "--out", str(root / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (root / "x.png").exists()


def test_python_api_errors_name_the_fix():
    with pytest.raises(UserError, match="tiles 'on' is unknown; use 'auto'"):
        ImagePrompt(tiles="on")

"""ControlNets and LoRAs from the command line: `batch` on 8 devices gives each item its single-device image and
a bad item fails alone; `generate` takes the ControlNet flags; bad input is one sentence, before any work."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from PIL import Image
from tiny_jobs import write_random_images, write_tiny_job

from ipadapter_jax.cli import main
from ipadapter_jax.pipelines.batch import run_batch
from ipadapter_jax.pipelines.control_inputs import canny_edges
from ipadapter_jax.pipelines.ip_adapter_pipeline import GenerationOutput, IPAdapterPipeline
from ipadapter_jax.tiny_models import (
    write_tiny_controlnet,
    write_tiny_lora,
    write_tiny_pipeline,
)
from ipadapter_jax.weights.safetensors_io import save_safetensors


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cncli")
    base, encoder, adapter = write_tiny_job(root)
    files = dict(root=root, base=base, encoder=encoder, adapter=adapter,
                 controlnet=write_tiny_controlnet(root / "cn", base),
                 lora=write_tiny_lora(root / "style.safetensors", base, style="kohya", alpha=2.0))
    files["controlnet_xl"] = write_tiny_controlnet(root / "cn_xl", write_tiny_pipeline(root / "sdxl", "sdxl"))
    files.update(write_random_images(root, {"ref": 40, "c0": 64, "c1": 80}))
    files["broken"] = root / "broken.png"
    files["broken"].write_bytes(b"not an image")
    files["bad_lora"] = root / "other.safetensors"
    save_safetensors({"lora_unet_no_such_block_proj.lora_down.weight": np.zeros((4, 8), np.float32),
                      "lora_unet_no_such_block_proj.lora_up.weight": np.zeros((8, 4), np.float32)}, files["bad_lora"])
    return files


def _models(t, *extra):
    return ["--base", str(t["base"]), "--image-encoder", str(t["encoder"]), "--adapter", str(t["adapter"]), *extra]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_bad_controlnet_and_lora_input_is_one_sentence(tiny, tmp_path, capsys, monkeypatch):
    t = tiny
    out = tmp_path / "x.png"
    generate = ["generate", *_models(t), "--image", str(t["ref"]), "--steps", "2", "--out", str(out)]
    cases = [
        (["--controlnet", str(t["controlnet"]), "--control-image", str(t["c0"]), "--control-image", str(t["c1"])],
         r"1 --controlnet but 2 --control-image were given; give one control image per ControlNet"),
        (["--controlnet", str(t["controlnet"]), "--control-image", str(t["broken"])],
         r"control image .*broken\.png is not a readable image"),
        (["--control-image", str(t["c0"])], r"--control-image needs --controlnet"),
        (["--controlnet", str(t["controlnet"]), "--control-image", str(t["c0"]), "--control-start", "0.8",
          "--control-end", "0.2"], r"the ControlNet window starts after it ends"),
        (["--controlnet", str(t["controlnet"]), "--control-image", str(t["c0"]), "--control-scale", "nan"],
         r"the ControlNet conditioning scale must be a number, not nan"),
        (["--controlnet", str(t["controlnet_xl"]), "--control-image", str(t["c0"])],
         r"was trained for SDXL but the base UNet is SD1\.x; load a ControlNet trained for SD1\.x"),
        (["--lora", str(t["bad_lora"])], r"other\.safetensors: key 'lora_unet_no_such_block_proj.lora_down.weight' "
                                         r"matches no layer of the unet"),
        (["--lora", f"{t['lora']}:inf"], r"the weight of --lora .* must be a number"),
    ]
    for flags, message in cases:
        assert main([*generate, *flags]) == 2, flags
        assert re.search(message, _error(capsys)), (flags, message)
    monkeypatch.setitem(sys.modules, "cv2", None)  # OpenCV not installed
    assert main([*generate, "--controlnet", str(t["controlnet"]), "--control-image", str(t["c0"]),
                 "--control-preprocess", "canny"]) == 2
    assert "pip install 'ipadapter-jax[cv]'" in _error(capsys)
    assert not out.exists()


def test_canny_preprocessing_matches_opencv(tiny):
    cv2 = pytest.importorskip("cv2")
    edges = np.asarray(canny_edges(tiny["c1"], 50, 150))
    expected = cv2.Canny(np.asarray(Image.open(tiny["c1"]).convert("RGB")), 50, 150)
    assert edges.shape == (80, 80, 3) and (edges == expected[..., None]).all() and edges.any()


def test_generate_passes_the_controlnet_and_lora_flags_to_the_pipeline(tiny, tmp_path, monkeypatch):
    """The command is thin parsing: what each flag becomes (the pipeline's behaviour is tested for parity)."""
    t, loaded, calls = tiny, {}, []

    class Recorder:
        adapters, load_seconds = [None], 0.0

        def __call__(self, prompt, **kwargs):
            calls.append(kwargs)
            return GenerationOutput(images=[], latents=np.zeros((1, 4, 16, 16), np.float32), timings={})

        def finish_weights_cache(self):
            return False

    def from_pretrained(base, **kwargs):
        loaded.update(kwargs)
        return Recorder()

    monkeypatch.setattr(IPAdapterPipeline, "from_pretrained", from_pretrained)
    canny = ["--control-preprocess", "canny:50,150"] if importlib.util.find_spec("cv2") else []
    assert main(["generate", *_models(t), "--image", str(t["ref"]), "--controlnet", str(t["controlnet"]),
                 "--controlnet", "lllyasviel/control_v11f1p_sd15_depth", "--control-image", str(t["c1"]),
                 "--control-image", str(t["c0"]), "--control-scale", "0.9", "--control-start", "0.25",
                 "--control-end", "0.75", "--guess-mode", "--lora", f"{t['lora']}:0.7", "--lora",
                 "owner/repo/lcm.safetensors", *canny, "--output-type", "latent",
                 "--out", str(tmp_path / "x.npy")]) == 0
    assert loaded["controlnets"] == [str(t["controlnet"]), "lllyasviel/control_v11f1p_sd15_depth"]
    assert loaded["loras"] == [(str(t["lora"]), 0.7), ("owner/repo/lcm.safetensors", 1.0)]
    call = calls[0]
    assert (call["control_scale"], call["control_start"], call["control_end"], call["guess_mode"]) == (
        [0.9, 0.9], 0.25, 0.75, True)
    first, second = (np.asarray(i) for i in call["control_image"])
    assert first.shape == (80, 80, 3) and second.shape == (64, 64, 3)  # in --controlnet order, resized later
    if canny:
        np.testing.assert_array_equal(first, np.asarray(canny_edges(t["c1"], 50, 150)))
    else:
        np.testing.assert_array_equal(first, np.asarray(Image.open(t["c1"]).convert("RGB")))


def test_batch_with_controlnet_on_eight_devices_gives_each_item_its_single_device_image(tiny, tmp_path, capsys):
    t = tiny
    items = [
        {"id": "a", "prompt": "a red square", "images": "ref.png", "control_images": "c0.png", "seed": 1,
         "control_scale": 0.5},
        {"id": "b", "prompt": "a blue circle", "images": "ref.png", "control_images": ["c1.png"], "seed": 2},
        {"id": "c", "prompt": "a cat", "images": "ref.png", "control_images": "c0.png", "seed": 3,
         "control_scale": 1.5, "guidance": 3.0},
        {"id": "missing", "images": "ref.png", "control_images": "nowhere.png"},
        {"id": "broken", "images": "ref.png", "control_images": "broken.png"},
        {"id": "two", "images": "ref.png", "control_images": ["c0.png", "c1.png"]},
        {"id": "nan", "images": "ref.png", "control_images": "c0.png", "control_scale": float("nan")},
        {"id": "none", "images": "ref.png"},
    ]
    manifest = t["root"] / "jobs.jsonl"
    manifest.write_text("\n".join(json.dumps(i) for i in items))
    flags = ["--controlnet", str(t["controlnet"]), "--lora", f"{t['lora']}:0.7", "--control-scale", "0.8",
             "--control-end", "0.75", "--guess-mode", "--steps", "2"]  # guess mode: split rows sliced per device
    assert main(["batch", *_models(t, *flags), "--manifest", str(manifest), "--out", str(tmp_path / "eight")]) == 1
    err = capsys.readouterr().err
    for name, reason in (("missing", "nowhere.png does not exist"), ("broken", "is not a readable image"),
                         ("two", "'control_images' needs one entry per ControlNet (1"),
                         ("nan", "conditioning scale must be a number"), ("none", "'control_images' is missing")):
        assert f"failed {name}: " in err and reason in err, (name, err)

    one = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    single = IPAdapterPipeline.from_pretrained(t["base"], image_encoder=t["encoder"], adapters=[t["adapter"]],
                                               controlnets=[t["controlnet"]], loras=[(t["lora"], 0.7)], mesh=one)
    defaults = dict(steps=2, control_scale=0.8, control_end=0.75, guess_mode=True)
    report = run_batch(single, manifest, tmp_path / "one", batch_size=1, defaults=defaults, progress=False)
    assert sorted(report.written) == ["a", "b", "c"]
    pixels = {}
    for name in "abc":
        eight, ref = (np.asarray(Image.open(tmp_path / d / f"{name}.png")) for d in ("eight", "one"))
        np.testing.assert_array_equal(eight, ref)
        pixels[name] = eight
    assert not np.array_equal(pixels["a"], pixels["c"])
    sidecar = json.loads((tmp_path / "eight" / "a.json").read_text())
    assert sidecar["control_scale"] == [0.5] and sidecar["control_end"] == [0.75] and sidecar["guess_mode"]

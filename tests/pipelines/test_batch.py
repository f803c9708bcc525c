"""Data-parallel batch generation: 8 fake devices give each item exactly the single-device image; resume; bad
items are reported without losing the others."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from PIL import Image
from reference_models import rel_err
from tiny_jobs import write_random_images, write_tiny_job

from ipadapter_jax.pipelines.batch import read_manifest, run_batch
from ipadapter_jax.pipelines.components import load_base
from ipadapter_jax.pipelines.ip_adapter_pipeline import IPAdapterPipeline


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    base, encoder, adapter = write_tiny_job(root)
    write_random_images(root, {f"ref{i}": 40 for i in range(3)})
    items = [
        {"id": "a", "prompt": "a red square", "images": "ref0.png", "seed": 1, "scale": 0.5},
        {"id": "b", "prompt": "a blue circle", "images": "ref1.png", "seed": 2, "guidance": 3.0},
        {"id": "c", "prompt": "", "images": "ref2.png", "seed": 3, "negative_prompt": "dark"},
        {"id": "d", "prompt": "a cat", "images": "ref0.png", "seed": 4, "scale": 1.2},
    ]
    manifest = root / "jobs.jsonl"
    manifest.write_text("\n".join(json.dumps(i) for i in items))
    pipe = IPAdapterPipeline.from_pretrained(base, image_encoder=encoder, adapters=[adapter])
    return root, manifest, pipe


def _single_device(pipe):
    return IPAdapterPipeline(pipe.base, pipe.adapters, image_encoder=pipe.image_encoder,
                             image_processor=pipe.image_processor, mesh=Mesh(np.asarray(jax.devices()[:1]), ("data",)))


def _pixels(folder, name):
    return np.asarray(Image.open(folder / f"{name}.png"))


def test_eight_devices_give_each_item_its_single_device_image(setup, tmp_path):
    root, manifest, pipe = setup
    assert pipe.mesh.size == 8
    defaults = {"steps": 3}
    sharded = run_batch(pipe, manifest, tmp_path / "eight", defaults=defaults, progress=False, contact_sheet=True)
    single = run_batch(_single_device(pipe), manifest, tmp_path / "one", batch_size=1, defaults=defaults,
                       progress=False)
    assert sorted(sharded.written) == sorted(single.written) == ["a", "b", "c", "d"]
    for name in "abcd":
        np.testing.assert_array_equal(_pixels(tmp_path / "eight", name), _pixels(tmp_path / "one", name))
    assert not np.array_equal(_pixels(tmp_path / "eight", "a"), _pixels(tmp_path / "eight", "d"))
    sidecar = json.loads((tmp_path / "eight" / "b.json").read_text())
    assert sidecar["guidance"] == 3.0 and sidecar["seed"] == 2 and sidecar["steps"] == 3
    assert (tmp_path / "eight" / "contact_sheet.png").exists()


def test_resume_skips_finished_items_and_bad_items_do_not_stop_the_run(setup, tmp_path):
    root, manifest, pipe = setup
    lines = manifest.read_text().splitlines()[:2] + [json.dumps({"id": "broken", "images": "missing.png"})]
    jobs = root / "resume.jsonl"
    jobs.write_text("\n".join(lines))
    first = run_batch(pipe, jobs, tmp_path, defaults={"steps": 2}, progress=False)
    assert sorted(first.written) == ["a", "b"]
    assert "missing.png" in first.failed["broken"] and "does not exist" in first.failed["broken"]
    before = _pixels(tmp_path, "b")
    (tmp_path / "a.png").unlink()
    second = run_batch(pipe, jobs, tmp_path, defaults={"steps": 2}, progress=False)
    assert second.written == ["a"] and second.skipped == ["b"]
    np.testing.assert_array_equal(_pixels(tmp_path, "b"), before)


def test_manifest_errors_name_the_line_and_key(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{"prompt": "y", "sede": 3}\n')
    items, failed = read_manifest(bad, 1)  # a bad line fails alone
    assert [item["prompt"] for item in items] == ["x"]
    assert re.search(r"line 2: unknown keys \['sede'\]", failed["000002"])
    bad.write_text('{"prompt": "x"\n')
    items, failed = read_manifest(bad, 1)
    assert items == [] and re.search("line 1: not valid JSON", failed["line 1"])


def test_base_folder_without_unet_is_a_clear_error(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(Exception, match="not a diffusers pipeline folder"):
        load_base(tmp_path)


def test_fsdp_sharded_weights_give_the_replicated_result(setup):
    root, manifest, pipe = setup
    base, encoder, adapter = root / "sd15", root / "encoder", root / "ip.safetensors"
    fsdp = IPAdapterPipeline.from_pretrained(base, image_encoder=encoder, adapters=[adapter], fsdp=4)
    assert dict(fsdp.mesh.shape) == {"data": 2, "fsdp": 4}
    kernel = fsdp.base.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.kernel[...]
    assert len({str(s.index) for s in kernel.addressable_shards}) == 4  # split four ways, not replicated
    common = dict(images=[root / "ref0.png"], num_inference_steps=2, seed=5, output_type="latent",
                  num_images_per_prompt=8)
    # split weights change the order of float32 sums, nothing else
    assert rel_err(fsdp("a cat", **common).latents, pipe("a cat", **common).latents) < 1e-5

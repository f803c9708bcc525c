"""`ipadapter-jax demo`: the whole project offline on tiny random models written in the real formats.

It writes a diffusers-format SD1.5-shaped pipeline, a CLIP image encoder and an IP-Adapter in the official
`.safetensors` layout; converts the adapter to Flax and back (checking the round trip is bit-exact); generates
with image prompts (text-to-image at several scales, two reference images, image-to-image, inpainting); trains
an adapter for a few steps on a synthetic dataset, exports it to the official layout and generates with it;
then writes a PNG grid and `summary.json` with timings. The weights are random, so the pictures are noise-like:
the point is that every real code path runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ipadapter_jax import images as imaging
from ipadapter_jax.data.synthetic import write_synthetic_dataset
from ipadapter_jax.pipelines.image_prompt import ImagePrompt
from ipadapter_jax.pipelines.ip_adapter_pipeline import IPAdapterPipeline
from ipadapter_jax.tiny_models import write_tiny_image_encoder, write_tiny_ip_adapter, write_tiny_pipeline
from ipadapter_jax.training import load_train_config, train
from ipadapter_jax.weights.ip_adapter_files import convert_to_flax, convert_to_torch
from ipadapter_jax.weights.safetensors_io import SafetensorsFile


def _log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _same_tensors(a: Path, b: Path) -> bool:
    fa, fb = SafetensorsFile(a), SafetensorsFile(b)
    return set(fa) == set(fb) and all(fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]) for k in fa)


def run_demo(out: str | Path, *, train: bool = True, steps: int = 12) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = out / "models"
    summary: dict = {"timings_s": {}}
    t = summary["timings_s"]

    start = time.perf_counter()
    base = write_tiny_pipeline(models / "tiny-sd15")
    encoder = write_tiny_image_encoder(models / "image_encoder")
    official = write_tiny_ip_adapter(models / "ip-adapter_tiny.safetensors", base, encoder)
    data = write_synthetic_dataset(out / "data", num_images=32, size=64, seed=0)
    t["write_models"] = time.perf_counter() - start
    _log(f"wrote a tiny diffusers pipeline, image encoder and official-layout IP-Adapter under {models}")

    start = time.perf_counter()
    flax_dir = models / "ip-adapter_tiny-flax"
    convert_to_flax(official, flax_dir, unet_config=base / "unet", overwrite=True)
    back = convert_to_torch(flax_dir, models / "ip-adapter_tiny-roundtrip.safetensors", overwrite=True)
    summary["roundtrip_bit_exact"] = _same_tensors(official, back)
    t["convert"] = time.perf_counter() - start
    _log(f"converted official -> Flax -> official: bit-exact = {summary['roundtrip_bit_exact']}")

    start = time.perf_counter()
    pipe = IPAdapterPipeline.from_pretrained(base, image_encoder=encoder, adapters=[flax_dir])
    t["load"] = time.perf_counter() - start
    refs = sorted(data.root.glob("*.png"))[:2]
    rows: list[list] = []
    common = dict(num_inference_steps=steps, guidance_scale=5.0, seed=0)

    start = time.perf_counter()
    rows.append([imaging.load_image(r).resize((64, 64)) for r in refs] + [
        pipe("a shape", images=[ImagePrompt(images=[refs[0]], scale=s)], **common).images[0]
        for s in (0.0, 0.5, 1.0)])
    t["first_generate_with_compile"] = time.perf_counter() - start
    start = time.perf_counter()
    rows.append([
        pipe("a shape", images=[ImagePrompt(images=refs, scale=1.0)], **common).images[0],
        pipe("a shape", images=[ImagePrompt(images=refs, combine="average")], **common).images[0],
        pipe("a shape", images=[refs[1]], init_image=refs[0], strength=0.6, **common).images[0],
        pipe("a shape", images=[refs[1]], init_image=refs[0], mask_image=_square_mask(64), **common).images[0],
        pipe("a shape", images=[refs[0]], ip_window=(0.0, 0.5), **common).images[0],
    ])
    t["generate_5_more"] = time.perf_counter() - start
    _log(f"generated {sum(len(r) for r in rows) - 2} images (text-to-image at scales 0/0.5/1, two references, "
         "averaged references, image-to-image, inpainting, an IP window)")

    if train:
        start = time.perf_counter()
        rows.append(_train_and_generate(out, base, encoder, data, refs, common, summary))
        t["train_and_generate"] = time.perf_counter() - start

    width = max(len(r) for r in rows)
    cells = [im for r in rows for im in r + [imaging.Image.new("RGB", (64, 64), "white")] * (width - len(r))]
    imaging.save_image(imaging.grid(cells, width), out / "grid.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    _log(f"wrote {out / 'grid.png'} and {out / 'summary.json'}; timings: "
         + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    return summary


def _square_mask(size: int) -> np.ndarray:
    mask = np.zeros((size, size), np.float32)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
    return mask


def _train_and_generate(out: Path, base: Path, encoder: Path, data, refs, common, summary) -> list:
    config_file = Path(__file__).resolve().parents[1] / "train" / "tiny.yaml"
    overrides = [f"workdir={out / 'train'}", f"model.base={base}", f"model.image_encoder={encoder}",
                 f"data.source={data.json_file}", f"data.image_root={data.root}"]
    result = train(load_train_config(config_file, overrides))
    summary["training"] = result.summary() if hasattr(result, "summary") else str(result)
    exported = Path(result.exported)
    _log(f"trained an adapter, exported {exported}")
    pipe = IPAdapterPipeline.from_pretrained(base, image_encoder=encoder, adapters=[exported])
    return [pipe("a shape", images=[ImagePrompt(images=[r], scale=1.0)], **common).images[0] for r in refs]

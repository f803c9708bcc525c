"""`ipadapter-jax demo`: a real, visible result offline, on the shapes world (`ipadapter_jax.world`).

Generations are captioned with the shape alone ("a circle"), so colours and position can reach a picture only
through the image prompt (the base learned them from captions that sometimes named them). The demo writes the
world's models in the real formats (diffusers folder, transformers image encoder, the shipped adapter in the
official `.safetensors` layout), converts the adapter to Flax and back (checking the round trip is bit-exact),
generates held-out scenes with the image prompt and text only, sweeps the IP scale, and reads every picture back
exactly to give the toy CLIP-I / CLIP-T. Then it trains a new adapter with the real training loop
(`train/world_adapter.yaml`), whose evaluation during training (`eval.*`) measures it before the first step and
after the last, and exports it.

Writes `grid.png` (annotated rows) and `summary.json` (metrics, timings, the round trip, the training run).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from ipadapter_jax.evaluation.world import evaluate_world, generate
from ipadapter_jax.images import save_image
from ipadapter_jax.pipelines.ip_adapter_pipeline import IPAdapterPipeline
from ipadapter_jax.training import load_train_config, train
from ipadapter_jax.weights.ip_adapter_files import convert_to_flax, convert_to_torch
from ipadapter_jax.weights.safetensors_io import SafetensorsFile
from ipadapter_jax.world.build import SHIPPED_ADAPTER, write_world_base, write_world_image_encoder
from ipadapter_jax.world.scenes import held_out_scenes, render

ROWS = 8  # reference scenes shown
STEPS = 500  # of the new adapter's training
SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)
CELL = 96  # displayed pixels per image


def _log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _same_tensors(a: Path, b: Path) -> bool:

    fa, fb = SafetensorsFile(a), SafetensorsFile(b)
    return set(fa) == set(fb) and all(fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]) for k in fa)


def _metrics(scores: dict) -> dict:
    return {k: v.as_dict() for k, v in scores.items()}


def _line(name: str, scores: dict) -> str:
    ip, text = scores["image_prompt"], scores["text_only"]
    return (f"{name}: toy CLIP-I {ip.clip_i:.3f} with the image prompt vs {text.clip_i:.3f} text only "
            f"(chance 0.167); toy CLIP-T {ip.clip_t:.3f} vs {text.clip_t:.3f}")


def run_demo(out: str | Path, *, train: bool = True, steps: int = STEPS, eval_scenes: int = 32) -> dict:

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = out / "models"
    summary: dict = {"timings_s": {}}
    t = summary["timings_s"]

    start = time.perf_counter()
    base = write_world_base(models / "world-base")
    encoder = write_world_image_encoder(models / "image_encoder")
    t["write_models"] = time.perf_counter() - start
    _log(f"wrote the shapes world's diffusers pipeline (trained UNet, exact VAE) and image encoder under {models}")

    start = time.perf_counter()
    flax_dir = models / "ip-adapter_world-flax"
    convert_to_flax(SHIPPED_ADAPTER, flax_dir, unet_config=base / "unet", overwrite=True)
    back = convert_to_torch(flax_dir, models / "ip-adapter_world-roundtrip.safetensors", overwrite=True)
    summary["roundtrip_bit_exact"] = _same_tensors(SHIPPED_ADAPTER, back)
    t["convert"] = time.perf_counter() - start
    _log(f"converted the shipped adapter official -> Flax -> official: bit-exact = {summary['roundtrip_bit_exact']}")

    start = time.perf_counter()
    pipe = IPAdapterPipeline.from_pretrained(base, image_encoder=encoder, adapters=[flax_dir], scheduler="ddim")
    scenes = held_out_scenes(eval_scenes)
    shipped = evaluate_world(pipe, scenes)
    summary["shipped_adapter"] = _metrics(shipped)
    sweep_scenes = [s for s in scenes[:4] for _ in SCALES]
    sweep = generate(pipe, sweep_scenes, scale=[x for _ in scenes[:4] for x in SCALES], seed=1000)
    t["load_generate_and_read"] = time.perf_counter() - start
    _log(_line("shipped adapter", shipped))

    rows = [("reference (image prompt)", [render(s) for s in scenes[:ROWS]]),
            ("image prompt + caption", shipped["image_prompt"].images[:ROWS]),
            ("caption only (scale 0)", shipped["text_only"].images[:ROWS])]
    for i in range(4):
        rows.append((f"scale {SCALES[0]}..{SCALES[-1]}", [render(scenes[i])] + sweep[i * len(SCALES):
                                                                                   (i + 1) * len(SCALES)]))
    if train:
        start = time.perf_counter()
        trained, evals = _train(out, steps, eval_scenes)
        summary["training"] = trained
        t["train_and_measure"] = time.perf_counter() - start
        for step, (metrics, images) in sorted(evals.items()):
            name = "before training (step 0)" if step == 0 else f"after {step} steps"
            _log(f"new adapter {name}: toy CLIP-I {metrics['clip_i']:.3f} with the image prompt (chance 0.167); "
                 f"toy CLIP-T {metrics['clip_t']:.3f} (its evaluation during training: seeds of its own)")
            rows.append((f"trained here, step {step}", images[:ROWS]))

    _grid(rows, out / "grid.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    _log(f"wrote {out / 'grid.png'} and {out / 'summary.json'}; timings: "
         + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    return summary


def _train(out: Path, steps: int, eval_scenes: int):
    """The real loop on `train/world_adapter.yaml`, evaluated (toy metrics on the first `eval_scenes` held-out
    scenes) before the first step and after the last; returns its record and {step: (metrics, images)}."""

    recipe = Path(__file__).resolve().parents[1] / "train" / "world_adapter.yaml"
    workdir = out / "train"
    if workdir.exists():  # a run of an earlier demo: start afresh, or it would resume at its last step
        shutil.rmtree(workdir)
    evals: dict = {}
    overrides = [f"workdir={workdir}", "monitor.progress_bar=false", f"total_steps={steps}",
                 f"eval.every_steps={steps}", f"eval.images=[world:{eval_scenes}]"]
    result = train(load_train_config(recipe, overrides), on_eval=lambda s, m, images: evals.update({s: (m, images)}))
    trained = {"steps": result.step, "resumed_from": result.resumed_from, "exported": str(result.exported),
               "first_loss": result.losses[0] if result.history else None,
               "last_loss": result.losses[-1] if result.history else None,
               "toy_metrics_with_image_prompt": {s: m for s, (m, _) in sorted(evals.items())},
               "eval_log": str(workdir / "eval.jsonl")}
    _log(f"trained an adapter {result.step} steps with train/world_adapter.yaml, exported {result.exported}")
    return trained, evals


def _grid(rows, path: Path) -> None:
    from PIL import Image, ImageDraw


    label_width = 190
    width = max(len(images) for _, images in rows)
    sheet = Image.new("RGB", (label_width + width * CELL, len(rows) * CELL), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows):
        draw.text((6, r * CELL + CELL // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            sheet.paste(image.resize((CELL, CELL), Image.NEAREST), (label_width + c * CELL, r * CELL))
    save_image(sheet, path)

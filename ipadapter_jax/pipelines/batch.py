"""Batch generation from a JSONL manifest, data-parallel over every device, resumable.

Each manifest line is one item; any key left out takes the run's default:

    {"id": "cat-01", "prompt": "a cat", "images": ["ref.png"], "seed": 1, "scale": 0.6}

Keys: id, prompt, negative_prompt, images (per adapter: a path or a list of paths; a single adapter may take a
plain path), negative_images, masks, face_embeds (per adapter: a .npy path), combine, scale (a float, or a list
with one entry per adapter), seed, steps, guidance, guidance_rescale, height, width, scheduler, eta, init_image,
strength, mask_image, ip_window ([start, end]); and the image-prompt controls, for every adapter of the item:
weight_type, composition_weight, layer_weights, embeds_scaling, negative_noise, tiles, plus composition_images
(per adapter, like images).

Items are grouped by everything that fixes compiled shapes (size, steps, sampler, number of reference images,
...), each group runs in batches of `batch_size` (padded to a multiple of the device count), and every item
writes `<id>.png` and a `<id>.json` sidecar of its settings. Finished items (both files present) are skipped,
so an interrupted run resumes where it stopped. An item's image depends only on its own settings and seed,
never on the batch it ran in or the number of devices.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from ipadapter_jax import images as imaging
from ipadapter_jax.errors import UserError
from ipadapter_jax.pipelines.image_prompt import CONTROL_DEFAULTS, ImagePrompt, per_adapter
from ipadapter_jax.pipelines.ip_adapter_pipeline import IPAdapterPipeline, Noise

CONTROL_KEYS = (*CONTROL_DEFAULTS, "composition_images")
ITEM_KEYS = ("id", "prompt", "negative_prompt", "images", "negative_images", "masks", "face_embeds", "combine",
             "scale", "seed", "steps", "guidance", "guidance_rescale", "height", "width", "scheduler", "eta",
             "init_image", "strength", "mask_image", "ip_window") + CONTROL_KEYS
DEFAULTS: dict[str, Any] = {"prompt": "", "negative_prompt": None, "scale": 1.0, "seed": 0, "steps": 30,
                            "guidance": 7.5, "guidance_rescale": 0.0, "height": None, "width": None,
                            "scheduler": None, "eta": 0.0, "init_image": None, "strength": None,
                            "mask_image": None, "ip_window": [0.0, 1.0], "combine": "concat", **CONTROL_DEFAULTS}


@dataclasses.dataclass
class BatchReport:
    written: list[str]
    skipped: list[str]  # already finished before this run
    failed: dict[str, str]  # id -> reason
    seconds: float


def _per_adapter(value, n: int, key: str, line: int):
    """A manifest value given per adapter (or once, for a single adapter)."""
    if value is None:
        return [None] * n
    if n == 1 and not (isinstance(value, list) and len(value) == 1 and isinstance(value[0], (list, type(None)))):
        return [value]
    return per_adapter(value if isinstance(value, list) else [value], n, f"manifest line {line}: '{key}'",
                       once=False)


def _resolve(root: Path, p):
    if p is None:
        return None
    if isinstance(p, list):
        return [_resolve(root, x) for x in p]
    path = Path(p).expanduser()
    return path if path.is_absolute() else root / path


def read_manifest(path: str | os.PathLike, num_adapters: int, defaults: dict | None = None) -> list[dict]:
    """Validated items with defaults applied; relative paths are relative to the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist.")
    settings = {**DEFAULTS, **(defaults or {})}
    items, seen = [], set()
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except ValueError as e:
            raise UserError(f"manifest {path} line {line_no} is not valid JSON ({e}).") from None
        if not isinstance(raw, dict):
            raise UserError(f"manifest {path} line {line_no} must be a JSON object.")
        unknown = sorted(set(raw) - set(ITEM_KEYS))
        if unknown:
            raise UserError(f"manifest {path} line {line_no} has unknown keys {unknown}; "
                            f"known: {', '.join(ITEM_KEYS)}.")
        item = {**settings, **raw}
        item["id"] = str(raw.get("id", f"{line_no:06d}"))
        if item["id"] in seen or "/" in item["id"] or item["id"].startswith("."):
            raise UserError(f"manifest {path} line {line_no}: id {item['id']!r} is repeated or not a plain file name.")
        seen.add(item["id"])
        for key in ("images", "negative_images", "masks", "face_embeds", "composition_images"):
            item[key] = [_resolve(path.parent, v) for v in _per_adapter(raw.get(key), num_adapters, key, line_no)]
        for key in ("init_image", "mask_image"):
            item[key] = _resolve(path.parent, item[key])
        scale = item["scale"]
        item["scale"] = per_adapter(scale if isinstance(scale, list) and num_adapters > 1 else [scale],
                                    num_adapters, f"manifest {path} line {line_no}: 'scale'")
        item["line"] = line_no
        items.append(item)
    if not items:
        raise UserError(f"manifest {path} has no items.")
    return items


def _as_list(x):
    return None if x is None else (x if isinstance(x, list) else [x])


def _image_prompts(item: dict) -> list[ImagePrompt]:
    prompts = []
    for a, scale in enumerate(item["scale"]):
        face = item["face_embeds"][a]
        prompts.append(ImagePrompt(
            images=[imaging.load_image(p, what="reference image") for p in _as_list(item["images"][a]) or []] or None,
            negative_images=_as_list(item["negative_images"][a]), masks=_as_list(item["masks"][a]),
            face_embeds=None if face is None else _load_npy(face), scale=scale, combine=item["combine"],
            composition_images=_as_list(item["composition_images"][a]), **{k: item[k] for k in CONTROL_DEFAULTS}))
    return prompts


def _load_npy(path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"face embedding {path} is not a readable .npy file ({e}).") from None


def _group_key(pipe: IPAdapterPipeline, item: dict, prompts: list[ImagePrompt]) -> tuple:
    size = item["height"] or pipe.base.default_size, item["width"] or pipe.base.default_size
    shapes = tuple((p.num_images, p.combine, bool(p.masks), json.dumps(p.masks, default=str)) for p in prompts)
    return (size, item["steps"], item["scheduler"], item["eta"], item["guidance"] > 1.0, item["init_image"] is not None,
            item["mask_image"] is not None, item["strength"], tuple(item["ip_window"]), shapes)


def run_batch(pipe: IPAdapterPipeline, manifest: str | os.PathLike, out_dir: str | os.PathLike, *,
              batch_size: int | None = None, defaults: dict | None = None, contact_sheet: bool = False,
              progress: bool = True) -> BatchReport:
    """Generate every unfinished item of `manifest` into `out_dir`; see the module docstring."""
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = read_manifest(manifest, len(pipe.adapters), defaults)
    devices = pipe.mesh.size
    batch_size = batch_size or devices
    report = BatchReport(written=[], skipped=[], failed={}, seconds=0.0)
    groups: OrderedDict[tuple, list[tuple[dict, list[ImagePrompt]]]] = OrderedDict()
    for item in items:
        if (out / f"{item['id']}.png").exists() and (out / f"{item['id']}.json").exists():
            report.skipped.append(item["id"])
            continue
        try:
            prompts = _image_prompts(item)
            for key in ("init_image", "mask_image"):
                if item[key] is not None:
                    imaging.load_image(item[key], what=key.replace("_", " "))
        except UserError as e:
            report.failed[item["id"]] = str(e)
            continue
        groups.setdefault(_group_key(pipe, item, prompts), []).append((item, prompts))

    todo = sum(len(g) for g in groups.values())
    bar = tqdm(total=todo, desc="generating", unit="img", disable=not progress)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            padded = chunk + [chunk[-1]] * (-len(chunk) % devices)
            try:
                _run_chunk(pipe, padded, len(chunk), out, report)
            except UserError as e:
                for item, _ in chunk:
                    report.failed[item["id"]] = str(e)
            bar.update(len(chunk))
    bar.close()
    if contact_sheet:
        done = [out / f"{item['id']}.png" for item in items if (out / f"{item['id']}.png").exists()]
        if done:
            sheet = imaging.grid([imaging.load_image(p) for p in done])
            imaging.save_png(sheet, out / "contact_sheet.png")
    report.seconds = time.perf_counter() - start
    return report


def _run_chunk(pipe: IPAdapterPipeline, padded: list, real: int, out: Path, report: BatchReport) -> None:
    first = padded[0][0]
    height = first["height"] or pipe.base.default_size
    width = first["width"] or pipe.base.default_size
    imaging.check_size(height, width, pipe.base.vae_scale_factor)
    shape = (height // pipe.base.vae_scale_factor, width // pipe.base.vae_scale_factor,
             pipe.base.vae.config.latent_channels)
    noise = Noise.from_seeds([item["seed"] for item, _ in padded], shape)
    negatives = [item["negative_prompt"] for item, _ in padded]
    init = first["init_image"]
    strength = first["strength"] if first["strength"] is not None else (
        1.0 if first["mask_image"] is not None or init is None else 0.8)
    t0 = time.perf_counter()
    pixels, _ = pipe.generate_batch(
        [item["prompt"] for item, _ in padded], None if all(n is None for n in negatives) else
        [n or "" for n in negatives], [], per_item=[p for _, p in padded] if pipe.adapters else None,
        noise=noise, num_inference_steps=first["steps"], guidance_scale=[item["guidance"] for item, _ in padded],
        guidance_rescale=[item["guidance_rescale"] for item, _ in padded], height=height, width=width,
        init=None if init is None else [item["init_image"] for item, _ in padded],
        mask=None if first["mask_image"] is None else [item["mask_image"] for item, _ in padded],
        strength=strength, ip_window=first["ip_window"], eta=first["eta"], scheduler=first["scheduler"])
    seconds = (time.perf_counter() - t0) / len(padded)
    pixels = _gather(pixels)
    if jax.process_index() != 0:  # every process ran the batch; the first one writes it
        report.written.extend(item["id"] for item, _ in padded[:real])
        return
    for (item, _), image in zip(padded[:real], imaging.to_pil(pixels[:real]), strict=True):
        imaging.save_png(image, out / f"{item['id']}.png")
        sidecar = {k: (str(v) if isinstance(v, Path) else v) for k, v in item.items() if k != "line"}
        sidecar.update(height=height, width=width, strength=strength, seconds_per_image=round(seconds, 4),
                       scheduler=item["scheduler"] or type(pipe.base.scheduler).__name__)
        _write_json(out / f"{item['id']}.json", sidecar)
        report.written.append(item["id"])


def _gather(x) -> np.ndarray:
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)

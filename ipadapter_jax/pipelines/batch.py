"""Batch generation from a JSONL manifest (pipelines/manifest.py), data-parallel over every device, resumable.

Items are grouped by everything that fixes compiled shapes (size, steps, sampler, number of reference images,
...), each group runs in batches of `batch_size` (padded to a multiple of the device count), and every item
writes `<id>.png` and a `<id>.json` sidecar of its settings. An item's image depends only on its own settings and
seed, never on the batch it ran in or the number of devices.

Resuming: a finished item is skipped only if the settings that determine its image (the item, the input files'
contents, the models) are those it was made with; otherwise it is regenerated. Outputs never overwrite inputs or
files this command did not write (each PNG carries a text chunk with its settings hash); such items fail alone,
with the reason, and the others go on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import OrderedDict
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from ipadapter_jax import images as imaging
from ipadapter_jax.errors import UserError
from ipadapter_jax.pipelines.image_prompt import CONTROL_DEFAULTS, ImagePrompt
from ipadapter_jax.pipelines.ip_adapter_pipeline import IPAdapterPipeline, Noise
from ipadapter_jax.pipelines.layer_controls import prompt_layers
from ipadapter_jax.pipelines.manifest import input_files, read_manifest
from ipadapter_jax.pipelines.settings import load_array, number

SIDECAR_FORMAT = "ipadapter_jax.batch_item"
PNG_MARK = "ipadapter_jax.batch"  # PNG text chunk: the settings hash of the item that wrote the image
SHEET = "contact_sheet"


@dataclasses.dataclass
class BatchReport:
    written: list[str]
    skipped: list[str]  # finished before this run, with the same settings
    failed: dict[str, str]  # id (or "line N") -> reason
    seconds: float
    redone: list[str] = dataclasses.field(default_factory=list)  # written before with other settings: regenerated


def _as_list(x):
    return None if x is None else (x if isinstance(x, list) else [x])


def _image_prompts(item: dict, config) -> list[ImagePrompt]:
    prompts = []
    for a, scale in enumerate(item["scale"]):
        face = item["face_embeds"][a]
        prompt = ImagePrompt(
            images=[imaging.load_image(p, what="reference image") for p in _as_list(item["images"][a]) or []] or None,
            negative_images=_as_list(item["negative_images"][a]), masks=_as_list(item["masks"][a]),
            face_embeds=None if face is None else load_array(face, "face embedding"), scale=scale,
            combine=item["combine"], composition_images=_as_list(item["composition_images"][a]),
            **{k: item[k] for k in CONTROL_DEFAULTS})
        prompt_layers(prompt, config, len(prompt.masks) if prompt.masks else None)  # scales checked per item here
        prompts.append(prompt)
    return prompts


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def settings_hash(item: dict, generator: dict) -> str:
    """What determines an item's image: its settings, its input files' contents and the models."""
    settings = {k: v for k, v in item.items() if k not in ("id", "line")}
    inputs = {str(p): _digest(p) for p in input_files(item) if p.is_file()}
    text = json.dumps({"item": settings, "inputs": inputs, "generator": generator}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _status(out: Path, item_id: str, digest: str) -> str:
    """"new", "done" (same settings), "redo" (ours, other settings or incomplete); a UserError for files of
    another origin."""
    png, sidecar = out / f"{item_id}.png", out / f"{item_id}.json"
    mark = imaging.png_text(png).get(PNG_MARK) if png.exists() else None
    if png.exists() and mark is None:
        raise UserError(f"{png} exists and was not written by ipadapter-jax batch; move it or choose another --out")
    record = None
    if sidecar.exists():
        try:
            record = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            record = None
        if not isinstance(record, dict) or record.get("format") != SIDECAR_FORMAT:
            raise UserError(f"{sidecar} exists and was not written by ipadapter-jax batch; move it or choose another "
                            "--out")
    if mark is None and record is None:
        return "new"
    if mark == digest and record is not None and record.get("settings_hash") == digest:
        return "done"
    return "redo"


def _group_key(pipe: IPAdapterPipeline, item: dict, prompts: list[ImagePrompt]) -> tuple:
    size = item["height"] or pipe.base.default_size, item["width"] or pipe.base.default_size
    shapes = tuple((p.num_images, p.combine, bool(p.masks), json.dumps(p.masks, default=str)) for p in prompts)
    control = tuple(tuple(item.get(k) or ()) for k in ("control_start", "control_end")) + (item.get("guess_mode"),)
    return (size, item["steps"], item["scheduler"], item["eta"], item["guidance"] > 1.0, item["init_image"] is not None,
            item["mask_image"] is not None, item["strength"], tuple(item["ip_window"]), shapes, control)


def run_batch(pipe: IPAdapterPipeline, manifest: str | os.PathLike, out_dir: str | os.PathLike, *,
              batch_size: int | None = None, defaults: dict | None = None, contact_sheet: bool = False,
              progress: bool = True) -> BatchReport:
    """Generate every item of `manifest` into `out_dir` that is not already there with its settings (module doc)."""
    start = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the images and their sidecars.")
    if batch_size is not None:
        number("batch_size", batch_size, low=1, integer=True)
    items, failed = read_manifest(manifest, len(pipe.adapters), defaults, len(pipe.controlnets))
    out.mkdir(parents=True, exist_ok=True)
    devices = pipe.mesh.size
    batch_size = batch_size or devices
    report = BatchReport(written=[], skipped=[], failed=failed, seconds=0.0)
    inputs = {Path(manifest).resolve(), *(p.resolve() for item in items for p in input_files(item))}
    groups: OrderedDict[tuple, list[tuple[dict, list[ImagePrompt]]]] = OrderedDict()
    for item in items:
        try:
            _check_outputs(out, item["id"], inputs, contact_sheet)
            item["settings_hash"] = settings_hash(item, pipe.sources)
            status = _status(out, item["id"], item["settings_hash"])
            if status == "done":
                report.skipped.append(item["id"])
                continue
            if status == "redo":
                report.redone.append(item["id"])
            prompts = _image_prompts(item, pipe.base.unet.config)
            for key in ("init_image", "mask_image"):
                if item[key] is not None:
                    imaging.load_image(item[key], what=key.replace("_", " "))
            for path in item.get("control_images") or ():
                imaging.load_image(path, what="control image")
        except UserError as e:
            report.failed[item["id"]] = str(e).rstrip(".") + "."
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
    if contact_sheet and jax.process_index() == 0:
        _write_contact_sheet(out, [item["id"] for item in items], inputs, report)
    report.seconds = time.perf_counter() - start
    return report


def _check_outputs(out: Path, item_id: str, inputs: set[Path], contact_sheet: bool) -> None:
    if contact_sheet and item_id == SHEET:
        raise UserError(f"the id {SHEET!r} is reserved for --contact-sheet's {SHEET}.png; rename the item")
    for path in (out / f"{item_id}.png", out / f"{item_id}.json"):
        if path.resolve() in inputs:
            raise UserError(f"its output {path} is one of the batch's inputs; choose another --out")


def _write_contact_sheet(out: Path, ids: list[str], inputs: set[Path], report: BatchReport) -> None:
    path = out / f"{SHEET}.png"
    if path.resolve() in inputs or path.exists() and SHEET not in imaging.png_text(path):
        report.failed[SHEET] = (f"{path} exists and was not written by ipadapter-jax batch (or is an input); the "
                                "contact sheet was not written: move it or choose another --out.")
        return
    done = [out / f"{i}.png" for i in ids if i not in report.failed and (out / f"{i}.png").exists()]
    if done:
        imaging.save_image(imaging.grid([imaging.load_image(p) for p in done]), path, text={SHEET: "1"})


def _run_chunk(pipe: IPAdapterPipeline, padded: list, real: int, out: Path, report: BatchReport) -> None:
    first = padded[0][0]
    height = first["height"] or pipe.base.default_size
    width = first["width"] or pipe.base.default_size
    imaging.check_size(height, width, pipe.base.vae_scale_factor)
    pipe.check_fits(len(padded), height, width)
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
        strength=strength, ip_window=first["ip_window"], eta=first["eta"], scheduler=first["scheduler"],
        **_control_arguments(pipe, padded))
    seconds = (time.perf_counter() - t0) / len(padded)
    pixels = _gather(pixels)
    if jax.process_index() != 0:  # every process ran the batch; the first one writes it
        report.written.extend(item["id"] for item, _ in padded[:real])
        return
    for (item, _), image in zip(padded[:real], imaging.to_pil(pixels[:real]), strict=True):
        # The image first (marked with the settings hash), then the sidecar: a run killed in between redoes it.
        imaging.save_image(image, out / f"{item['id']}.png", text={PNG_MARK: item["settings_hash"]})
        sidecar = {k: (str(v) if isinstance(v, Path) else v) for k, v in item.items() if k != "line"}
        sidecar.update(format=SIDECAR_FORMAT, height=height, width=width, strength=strength,
                       seconds_per_image=round(seconds, 4),
                       scheduler=item["scheduler"] or type(pipe.base.scheduler).__name__)
        _write_json(out / f"{item['id']}.json", sidecar)
        report.written.append(item["id"])


def _control_arguments(pipe: IPAdapterPipeline, padded: list) -> dict:
    """generate_batch's ControlNet arguments: per ControlNet each item's image and scale; the group's windows."""
    if not pipe.controlnets:
        return {}
    first = padded[0][0]
    per_net = range(len(pipe.controlnets))
    return dict(control=[[item["control_images"][k] for item, _ in padded] for k in per_net],
                control_scale=[[item["control_scale"][k] for item, _ in padded] for k in per_net],
                control_start=first["control_start"], control_end=first["control_end"],
                guess_mode=first["guess_mode"])


def _gather(x) -> np.ndarray:
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)

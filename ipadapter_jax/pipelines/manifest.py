"""JSONL manifests of batch generation: one item per line, each checked on its own so that a bad line or value
fails that item alone (with its id and the reason) and never the others.

    {"id": "cat-01", "prompt": "a cat", "images": ["ref.png"], "seed": 1, "scale": 0.6}

Keys: id, prompt, negative_prompt, images (per adapter: a path or a list of paths; a single adapter may take a
plain path), negative_images, masks, face_embeds (per adapter: a .npy path), combine, scale (a float, or a list
with one entry per adapter), seed, steps, guidance, guidance_rescale, height, width, scheduler, eta, init_image,
strength, mask_image, ip_window ([start, end]); and the image-prompt controls, for every adapter of the item:
weight_type, composition_weight, layer_weights, embeds_scaling, negative_noise, tiles, plus composition_images
(per adapter, like images). With ControlNets loaded: control_images (one path per ControlNet, in their order; a
single ControlNet may take a plain path), control_scale (a float, or one per ControlNet), control_start and
control_end (fractions of the steps, once or per ControlNet) and guess_mode. Any key left out takes the run's
default; relative paths are relative to the manifest's folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ipadapter_jax.errors import UserError
from ipadapter_jax.pipelines.control_inputs import check_control_settings, per_controlnet
from ipadapter_jax.pipelines.image_prompt import COMBINE_MODES, CONTROL_DEFAULTS, per_adapter
from ipadapter_jax.pipelines.settings import check_generation, number
from ipadapter_jax.schedulers import SCHEDULERS

ITEM_KEYS = ("id", "prompt", "negative_prompt", "images", "negative_images", "masks", "face_embeds", "combine",
             "scale", "seed", "steps", "guidance", "guidance_rescale", "height", "width", "scheduler", "eta",
             "init_image", "strength", "mask_image", "ip_window", *CONTROL_DEFAULTS, "composition_images",
             "control_images", "control_scale", "control_start", "control_end", "guess_mode")
DEFAULTS: dict[str, Any] = {"prompt": "", "negative_prompt": None, "scale": 1.0, "seed": 0, "steps": 30,
                            "guidance": 7.5, "guidance_rescale": 0.0, "height": None, "width": None,
                            "scheduler": None, "eta": 0.0, "init_image": None, "strength": None,
                            "mask_image": None, "ip_window": [0.0, 1.0], "combine": "concat", **CONTROL_DEFAULTS}
# Only items of runs with ControlNets carry these, so other runs' settings hashes stay as they were.
CONTROLNET_DEFAULTS: dict[str, Any] = {"control_images": None, "control_scale": 1.0, "control_start": 0.0,
                                       "control_end": 1.0, "guess_mode": False}
PER_ADAPTER_PATHS = ("images", "negative_images", "masks", "face_embeds", "composition_images")
PATHS = ("init_image", "mask_image")


def check_manifest_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"manifest {path} is a folder; pass the JSONL file (one JSON object per line).")
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist; check the path.")
    return path


def read_manifest(path: str | os.PathLike, num_adapters: int, defaults: dict | None = None, num_controlnets: int = 0
                  ) -> tuple[list[dict], dict[str, str]]:
    """(valid items with defaults applied, {id or "line N": reason} for the lines that are not)."""
    path = check_manifest_path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"manifest {path} is not UTF-8 text; write it as JSONL (one JSON object per line).") from None
    settings = {**DEFAULTS, **(CONTROLNET_DEFAULTS if num_controlnets else {}), **(defaults or {})}
    items: list[dict] = []
    failed: dict[str, str] = {}
    seen: dict[str, int] = {}
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        name = f"line {line_no}"
        try:
            try:
                raw = json.loads(line)
            except ValueError as e:
                raise UserError(f"not valid JSON ({e})") from None
            if not isinstance(raw, dict):
                raise UserError("it must be a JSON object")
            name = _item_id(raw, line_no)
            if name in seen:
                repeated, name = name, f"line {line_no}"
                raise UserError(f"its id {repeated!r} repeats line {seen[repeated]}")
            seen[name] = line_no
            items.append(_item(raw, settings, path.parent, num_adapters, name, line_no, num_controlnets))
        except UserError as e:
            failed[name] = f"manifest {path.name} line {line_no}: {str(e).rstrip('.')}."
    if not items and not failed:
        raise UserError(f"manifest {path} has no items.")
    return items, failed


def _item_id(raw: dict, line_no: int) -> str:
    value = raw.get("id", f"{line_no:06d}")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UserError(f"'id' must be a string, not {value!r}")
    name = str(value)
    if not name or "/" in name or "\\" in name or name.startswith(".") or len(name) > 200:
        raise UserError(f"id {name!r} is not a plain file name (no slashes, not starting with a dot)")
    return name


def _text(key: str, value):
    if value is not None and not isinstance(value, str):
        raise UserError(f"'{key}' must be text or null, not {value!r}")
    return value


def _paths(key: str, value):
    """A path, a list of paths, or null (a list per adapter is split by `_per_adapter`)."""
    values = value if isinstance(value, list) else [value]
    for v in values:
        nested_ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
        if not (v is None or isinstance(v, str) or nested_ok):
            raise UserError(f"'{key}' must be a path or a list of paths, not {value!r}")
    return value


def _resolve(root: Path, p):
    if p is None:
        return None
    if isinstance(p, list):
        return [_resolve(root, x) for x in p]
    path = Path(p).expanduser()
    return path if path.is_absolute() else root / path


def _per_adapter(value, n: int, key: str):
    """A manifest value given per adapter (or once, for a single adapter)."""
    if value is None:
        return [None] * n
    if n == 1 and not (isinstance(value, list) and len(value) == 1 and isinstance(value[0], (list, type(None)))):
        return [value]
    return per_adapter(value if isinstance(value, list) else [value], n, f"'{key}'", once=False)


def _item(raw: dict, settings: dict, root: Path, num_adapters: int, name: str, line_no: int,
          num_controlnets: int = 0) -> dict:
    unknown = sorted(set(raw) - set(ITEM_KEYS))
    if unknown:
        raise UserError(f"unknown keys {unknown}; known: {', '.join(ITEM_KEYS)}")
    item = {**settings, **raw, "id": name, "line": line_no}
    for key in ("prompt", "negative_prompt", "scheduler", "combine"):
        _text(key, item[key])
    if item["prompt"] is None:
        raise UserError("'prompt' must be text (use \"\" for none)")
    if item["scheduler"] is not None and item["scheduler"] not in SCHEDULERS:
        raise UserError(f"'scheduler' {item['scheduler']!r} is unknown; use one of {', '.join(SCHEDULERS)}")
    if item["combine"] not in COMBINE_MODES:
        raise UserError(f"'combine' {item['combine']!r} is unknown; use one of {', '.join(COMBINE_MODES)}")
    check_generation(steps=item["steps"], guidance=item["guidance"], guidance_rescale=item["guidance_rescale"],
                     eta=item["eta"], strength=item["strength"], ip_window=item["ip_window"], seed=item["seed"])
    item["ip_window"] = [float(v) for v in item["ip_window"]]
    for key in ("height", "width"):
        if item[key] is not None:
            number(key, item[key], low=1, integer=True)
    for key in PER_ADAPTER_PATHS:
        item[key] = [_resolve(root, v) for v in _per_adapter(_paths(key, raw.get(key)), num_adapters, key)]
    for key in PATHS:
        item[key] = _resolve(root, _paths(key, item[key]))
    if item["mask_image"] is not None and item["init_image"] is None:
        raise UserError("'mask_image' needs 'init_image' as well (inpainting repaints part of an image)")
    scale = item["scale"]
    item["scale"] = per_adapter(scale if isinstance(scale, list) and num_adapters > 1 else [scale], num_adapters,
                                "'scale'")
    if num_controlnets:
        _controlnet_keys(item, raw, root, num_controlnets)
    elif given := sorted(set(raw) & set(CONTROLNET_DEFAULTS)):
        raise UserError(f"{given[0]!r} needs a ControlNet, and this run has none; pass --controlnet")
    return item


def _controlnet_keys(item: dict, raw: dict, root: Path, n: int) -> None:
    """The item's control images, scales, windows and guess mode, one per ControlNet, checked."""
    images = item["control_images"]
    if images is None:
        raise UserError(f"'control_images' is missing; give one control image per ControlNet ({n})")
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise UserError(f"'control_images' must be a path or a list of paths (one per ControlNet), not {images!r}")
    item["control_images"] = [_resolve(root, p) for p in per_controlnet(images, n, "'control_images'", once=False)]
    for key in ("control_scale", "control_start", "control_end"):
        item[key] = per_controlnet(item[key], n, f"'{key}'")
    check_control_settings(item["control_scale"], item["control_start"], item["control_end"])
    for key in ("control_scale", "control_start", "control_end"):
        item[key] = [float(v) for v in item[key]]
    if not isinstance(item["guess_mode"], bool):
        raise UserError(f"'guess_mode' must be true or false, not {item['guess_mode']!r}")


def input_files(item: dict) -> list[Path]:
    """Every file an item reads."""
    out: list[Path] = []
    for key in PER_ADAPTER_PATHS:
        for value in item[key]:
            out += [Path(v) for v in (value if isinstance(value, list) else [value]) if v is not None]
    out += [Path(item[key]) for key in PATHS if item[key] is not None]
    out += [Path(p) for p in item.get("control_images") or ()]
    return out

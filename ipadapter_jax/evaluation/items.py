"""What to score: generated images with their reference images and captions.

Accepted inputs:
- a JSONL manifest, one item a line: ``{"id": "x", "image": "gen.png", "references": ["ref.png"],
  "captions": ["a cat"]}`` (``reference``/``caption`` may be single values; paths relative to the manifest);
- a folder of ``<id>.png`` images with ``<id>.json`` sidecars (``ipadapter-jax batch`` output): the
  sidecar's ``references``/``captions`` if present, else its ``images`` (the first adapter's reference
  images) and its ``prompt`` (a non-empty one) as the caption.

Every item needs a reference image (CLIP-I) or a caption (CLIP-T) or both.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ipadapter_jax.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclasses.dataclass(frozen=True)
class EvalItem:
    id: str
    image: Path
    references: tuple[Path, ...]
    captions: tuple[str, ...]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # other manifest keys, carried into the scores


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _path(root: Path, value, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise UserError(f"{where}: image paths must be non-empty strings, not {value!r}.")
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path


_KEYS = ("id", "image", "references", "reference", "captions", "caption")


def _item(raw: dict, root: Path, where: str, default_id: str, extra_keys=None) -> EvalItem:
    if "image" not in raw:
        raise UserError(f"{where} has no 'image' (the generated image to score).")
    references = _as_list(raw.get("references", raw.get("reference")))
    captions = [str(c) for c in _as_list(raw.get("captions", raw.get("caption"))) if str(c).strip()]
    if not references and not captions:
        raise UserError(f"{where} has neither 'references' nor 'captions'; give at least one.")
    extra = {k: v for k, v in raw.items() if k not in _KEYS and (extra_keys is None or k in extra_keys)}
    return EvalItem(id=str(raw.get("id", default_id)), image=_path(root, raw["image"], where),
                    references=tuple(_path(root, r, where) for r in references), captions=tuple(captions),
                    extra=extra)


def read_manifest(path: Path) -> list[EvalItem]:
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path} line {n} is not valid JSON ({e}).") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path} line {n} must be a JSON object.")
        items.append(_item(raw, path.parent, f"{path} line {n}", f"{n:06d}"))
    return items


def _sidecar_item(image: Path, sidecar: Path) -> EvalItem:
    try:
        raw = json.loads(sidecar.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"sidecar {sidecar} is not valid JSON ({e}).") from None
    if not isinstance(raw, dict):
        raise UserError(f"sidecar {sidecar} must hold a JSON object.")
    references = raw.get("references", raw.get("reference"))
    if references is None and raw.get("images"):
        first = raw["images"][0] if isinstance(raw["images"], list) else raw["images"]  # the first adapter's
        references = _as_list(first)
    captions = raw.get("captions", raw.get("caption"))
    if captions is None and str(raw.get("prompt") or "").strip():
        captions = [raw["prompt"]]
    fields = {**raw, "image": str(image), "references": references, "captions": captions}
    return _item(fields, sidecar.parent, f"sidecar {sidecar}", image.stem, extra_keys=("seed", "scale", "prompt"))


def read_folder(folder: Path) -> list[EvalItem]:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    items = [_sidecar_item(p, p.with_suffix(".json")) for p in images if p.with_suffix(".json").is_file()]
    if not items:
        raise UserError(f"{folder} holds no images with <id>.json sidecars; pass an `ipadapter-jax batch` output "
                        "folder or a JSONL manifest (see `ipadapter-jax evaluate --help`).")
    return items


def read_items(source: str | Path) -> list[EvalItem]:
    """The items of a JSONL manifest or a folder with sidecars (module doc); ids must be unique."""
    path = Path(source)
    if path.is_dir():
        items = read_folder(path)
    elif path.is_file():
        items = read_manifest(path)
    else:
        raise UserError(f"{path} does not exist; pass a folder of generated images with sidecars or a JSONL "
                        "manifest.")
    if not items:
        raise UserError(f"{path} lists no items to score.")
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise UserError(f"{path}: item id {item.id!r} appears twice; ids must be unique.")
        seen.add(item.id)
    return items


def check_images(items: list[EvalItem]) -> None:
    """Fail before any work if an image is missing or will not open (headers only: cheap)."""
    from PIL import Image, UnidentifiedImageError

    for item in items:
        for path, what in [(item.image, "generated image")] + [(r, "reference image") for r in item.references]:
            if not path.is_file():
                raise UserError(f"{what} {path} (item {item.id}) does not exist; check the path.")
            try:
                with Image.open(path) as im:
                    im.verify()
            except (UnidentifiedImageError, OSError, SyntaxError) as e:
                raise UserError(f"{what} {path} (item {item.id}) is not a readable image ({e}); use a PNG, JPEG or "
                                "WebP file.") from None

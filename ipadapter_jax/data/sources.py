"""Raw training inputs: the official JSON list (``tutorial_train.py``) or a folder of images with captions.

Listing never opens images; :func:`load_example` does, and reports a broken record by raising
:class:`SkipRecord` with one of the ``SKIP_*`` reasons, so a prepare run counts it and carries on.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ipadapter_jax.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FACE_EMBED_DIM = 512

SKIP_MALFORMED_ENTRY = "malformed entry"
SKIP_MISSING_IMAGE = "missing image file"
SKIP_UNREADABLE_IMAGE = "unreadable image"
SKIP_MISSING_CAPTION = "missing caption file"
SKIP_UNREADABLE_CAPTION = "unreadable caption file"
SKIP_EMPTY_CAPTION = "empty caption"
SKIP_MISSING_FACE_EMBED = "missing face embedding"
SKIP_UNREADABLE_FACE_EMBED = "unreadable face embedding"
SKIP_BAD_FACE_EMBED = "face embedding not 512 finite values"

# What PIL raises on truncated, corrupt or hostile files.
IMAGE_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class SkipRecord(Exception):
    """A record that cannot be used; ``reason`` is one of the ``SKIP_*`` strings."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class SourceItem:
    """One listed record: where its image, caption and optional face embedding are."""

    key: str  # a readable identifier for reports: the JSON image_file or the image's relative path
    image_path: Path | None
    text: str | None  # None: read from caption_path
    caption_path: Path | None = None
    face_embed_path: Path | None = None
    problem: str | None = None  # set when listing already found the entry unusable


def read_official_json(json_file: str | Path, image_root: str | Path | None = None) -> list[SourceItem]:
    """List ``[{"image_file", "text"[, "id_embed_file"]}, ...]`` in ``.json``, or one a line in ``.jsonl``.

    ``image_file`` and ``id_embed_file`` are joined onto ``image_root`` (default: the JSON file's folder),
    as ``os.path.join(data_root_path, image_file)`` in the official script; absolute paths stay as they are.
    """
    json_file = Path(json_file)
    if not json_file.is_file():
        raise UserError(f"Training list {json_file} does not exist; pass a JSON file in the official format.")
    root = Path(image_root) if image_root is not None else json_file.parent
    if not root.is_dir():
        raise UserError(f"Image root {root} is not a folder; pass the folder that image_file is relative to.")
    try:
        text = json_file.read_text(encoding="utf-8")
        if json_file.suffix == ".jsonl":
            entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            entries = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{json_file} is not valid JSON ({e}); fix or regenerate it.") from None
    if not isinstance(entries, list):
        raise UserError(f"{json_file} holds a {type(entries).__name__}, not a list of records; "
                        "use the official format.")
    items = []
    for i, entry in enumerate(entries):
        if not (isinstance(entry, dict) and isinstance(entry.get("image_file"), str)
                and isinstance(entry.get("text"), str)):
            items.append(SourceItem(f"entry {i}", None, None, problem=SKIP_MALFORMED_ENTRY))
            continue
        face = entry.get("id_embed_file")
        if face is not None and not isinstance(face, str):
            items.append(SourceItem(entry["image_file"], None, None, problem=SKIP_MALFORMED_ENTRY))
            continue
        items.append(SourceItem(
            key=entry["image_file"],
            image_path=root / entry["image_file"],
            text=entry["text"],
            face_embed_path=root / face if face is not None else None,
        ))
    return items


def scan_caption_folder(folder: str | Path) -> list[SourceItem]:
    """List every image under ``folder`` (recursively, sorted) with the caption in the ``.txt`` beside it.

    An image without a caption file is listed and later skipped as ``SKIP_MISSING_CAPTION``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"Caption folder {folder} does not exist; pass a folder of captioned images.")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [
        SourceItem(p.relative_to(folder).as_posix(), p, None, caption_path=p.with_suffix(".txt"))
        for p in images
    ]


def list_source(source: str | Path, image_root: str | Path | None = None) -> list[SourceItem]:
    """List an official JSON/JSONL file or a caption folder, chosen by what ``source`` is."""
    source = Path(source)
    if source.is_dir():
        if image_root is not None:
            raise UserError("image_root applies to a JSON training list, not a caption folder; leave it out.")
        items = scan_caption_folder(source)
    elif source.suffix in (".json", ".jsonl"):
        items = read_official_json(source, image_root)
    else:
        raise UserError(
            f"Data source {source} is neither a folder of captioned images nor a .json/.jsonl training list."
        )
    _check_face_embed_loaders(items)
    return items


def _check_face_embed_loaders(items: list[SourceItem]) -> None:
    needs_torch = next((i.face_embed_path for i in items
                        if i.face_embed_path is not None and i.face_embed_path.suffix != ".npy"), None)
    if needs_torch is not None and importlib.util.find_spec("torch") is None:
        raise UserError(
            f"Face embedding {needs_torch} is a torch file and torch is not installed; "
            "install torch (pip install torch) or save the embeddings with numpy.save as .npy."
        )


def load_example(item: SourceItem, *, with_face_embed: bool) -> dict:
    """Read one item as ``{"image": bytes, "text": str[, "face_embed": float32 (512,)]}``, or SkipRecord.

    The image is fully decoded to prove it is readable. RGB PNG/JPEG files are stored byte-for-byte;
    anything else is converted to RGB (``Image.convert``, as the official script does) and stored as PNG.
    """
    if item.problem is not None:
        raise SkipRecord(item.problem)
    text = _read_caption(item)
    if not text.strip():
        raise SkipRecord(SKIP_EMPTY_CAPTION)
    example = {"image": _read_image_bytes(item.image_path), "text": text}
    if with_face_embed:
        if item.face_embed_path is None:
            raise SkipRecord(SKIP_MISSING_FACE_EMBED)
        example["face_embed"] = load_face_embedding(item.face_embed_path)
    return example


def _read_caption(item: SourceItem) -> str:
    if item.text is not None:
        return item.text
    try:
        return item.caption_path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise SkipRecord(SKIP_MISSING_CAPTION) from None
    except (OSError, UnicodeDecodeError):
        raise SkipRecord(SKIP_UNREADABLE_CAPTION) from None


def _read_image_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SkipRecord(SKIP_MISSING_IMAGE) from None
    except IsADirectoryError:
        raise SkipRecord(SKIP_MISSING_IMAGE) from None
    except OSError:
        raise SkipRecord(SKIP_UNREADABLE_IMAGE) from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.width == 0 or image.height == 0:
                raise SkipRecord(SKIP_UNREADABLE_IMAGE)
            if image.format in ("PNG", "JPEG") and image.mode == "RGB":
                return data
            out = io.BytesIO()
            image.convert("RGB").save(out, format="PNG")
            return out.getvalue()
    except IMAGE_DECODE_ERRORS:
        raise SkipRecord(SKIP_UNREADABLE_IMAGE) from None


def load_face_embedding(path: Path) -> np.ndarray:
    """A 512-d face embedding from ``.npy`` or a torch file (``torch.load``, as FaceID), or SkipRecord."""
    try:
        if path.suffix == ".npy":
            value = np.load(path, allow_pickle=False)
        else:
            import torch  # only for .bin/.pt embeddings; list_source checked it is installed

            value = torch.load(path, map_location="cpu", weights_only=True)
            value = value.detach().float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    except FileNotFoundError:
        raise SkipRecord(SKIP_MISSING_FACE_EMBED) from None
    except Exception:  # noqa: BLE001 - any failure to parse the file makes this one record unusable
        raise SkipRecord(SKIP_UNREADABLE_FACE_EMBED) from None
    return check_face_embedding(value)


def check_face_embedding(value) -> np.ndarray:
    """``value`` as float32 (512,), accepting (1, 512); SkipRecord for any other size or non-finite values."""
    try:
        value = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise SkipRecord(SKIP_BAD_FACE_EMBED) from None
    if value.size != FACE_EMBED_DIM or value.ndim > 2 or not np.isfinite(value).all():
        raise SkipRecord(SKIP_BAD_FACE_EMBED)
    return value.reshape(FACE_EMBED_DIM)

"""The paper's Table 1 protocol on COCO2017 val (§4.1.2, §4.2.1): every image is an image prompt; 4 images
are generated per prompt with DDIM, 50 steps, guidance 7.5, IP scale 1.0 and an empty text prompt; CLIP-I is
against the prompt image and CLIP-T (CLIPScore) against its captions, both with CLIP ViT-L/14.

Generation goes through `pipelines.batch.run_batch` from a manifest written here, so it is data-parallel and
resumable, and each item's seed (image id * 4 + k, plus `seed`) is recorded in the manifest and its sidecar.
Layout of `out/`: `generation.jsonl` (the batch manifest), `images/` (PNGs + sidecars), `references/` (prompt
images taken from TFDS), `evaluation.jsonl` (what is scored), `scores.jsonl`, `summary.json`.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path

from ipadapter_jax.errors import UserError
from ipadapter_jax.evaluation.report import write_atomic, write_jsonl
from ipadapter_jax.images import save_image

PAPER_IP_ADAPTER = {"clip_t": 0.588, "clip_i": 0.828, "images": 5000}  # Table 1, SD1.5 + IP-Adapter (22M)
SETTINGS = {"prompt": "", "scale": 1.0, "steps": 50, "guidance": 7.5, "scheduler": "ddim"}
PER_PROMPT = 4


@dataclasses.dataclass(frozen=True)
class CocoImage:
    image_id: int
    path: Path
    captions: tuple[str, ...]


def _read_captions(captions_file: Path) -> tuple[dict[int, str], dict[int, list[str]]]:
    """(file name by image id, captions by image id) of a COCO captions file."""
    if not captions_file.is_file():
        raise UserError(f"COCO captions file {captions_file} does not exist; pass annotations/captions_val2017.json.")
    try:
        data = json.loads(captions_file.read_text(encoding="utf-8"))
        names = {int(im["id"]): im["file_name"] for im in data["images"]}
        captions: dict[int, list[str]] = defaultdict(list)
        for ann in data["annotations"]:
            captions[int(ann["image_id"])].append(str(ann["caption"]).strip())
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{captions_file} is not a COCO captions file ({e!r}); pass captions_val2017.json.") from None
    if not captions:
        raise UserError(f"{captions_file} lists no captioned images.")
    return names, captions


def read_coco_captions(captions_file: str | Path, images_dir: str | Path, limit: int | None = None
                       ) -> list[CocoImage]:
    """The images of a COCO ``captions_*.json`` with their captions, by image id; the first ``limit``."""
    captions_file, images_dir = Path(captions_file), Path(images_dir)
    names, captions = _read_captions(captions_file)
    if not images_dir.is_dir():
        raise UserError(f"COCO image folder {images_dir} does not exist; pass the val2017/ folder.")
    out = []
    for image_id in sorted(i for i in names if captions.get(i))[:limit]:
        path = images_dir / names[image_id]
        if not path.is_file():
            raise UserError(f"COCO image {path} (id {image_id}) is missing; check the image folder.")
        out.append(CocoImage(image_id, path, tuple(captions[image_id])))
    return out


def read_coco_tfds(captions_file: str | Path, data_dir: str | Path, out_dir: Path, limit: int | None = None
                   ) -> list[CocoImage]:
    """Prompt images from a prepared TFDS ``coco/2017`` validation split (written as PNGs under ``out_dir``),
    captions from ``captions_file`` (TFDS coco/2017 carries none)."""
    import tensorflow_datasets as tfds
    from PIL import Image

    _, captions = _read_captions(Path(captions_file))
    builder = tfds.builder("coco/2017", data_dir=str(data_dir))
    if not builder.is_prepared():
        raise UserError(f"TFDS coco/2017 is not prepared in {data_dir}; prepare it or pass --images instead.")
    wanted = set(sorted(captions)[:limit])
    found: dict[int, CocoImage] = {}
    for record in builder.as_data_source(split="validation"):
        image_id = int(record["image/id"])
        if image_id in wanted and image_id not in found:
            path = out_dir / f"{image_id:012d}.png"
            if not path.is_file():
                write_png(Image.fromarray(record["image"]), path)
            found[image_id] = CocoImage(image_id, path, tuple(captions[image_id]))
            if len(found) == len(wanted):
                break
    missing = sorted(wanted - set(found))
    if missing:
        raise UserError(f"TFDS coco/2017 validation has no image with id {missing[0]} that {captions_file} captions.")
    return [found[i] for i in sorted(found)]


def write_png(image, path: Path) -> None:

    save_image(image, path)


def generation_manifest(images: list[CocoImage], out: Path, *, seed: int = 0, scale: float = 1.0,
                        steps: int = 50, guidance: float = 7.5, per_prompt: int = PER_PROMPT,
                        height: int | None = None, width: int | None = None) -> Path:
    """`out/generation.jsonl`: `per_prompt` items per image prompt with the paper's settings (module doc)."""
    rows = []
    for im in images:
        for k in range(per_prompt):
            row = {**SETTINGS, "id": f"{im.image_id:012d}_{k}", "images": str(im.path.absolute()),
                   "seed": (seed + im.image_id * per_prompt + k) % 2**32, "scale": scale, "steps": steps,
                   "guidance": guidance}
            if height and width:
                row.update(height=height, width=width)
            rows.append(row)
    return write_jsonl(out / "generation.jsonl", rows)


def evaluation_manifest(images: list[CocoImage], out: Path, per_prompt: int = PER_PROMPT) -> Path:
    """`out/evaluation.jsonl`: each generated image with its prompt image and that image's captions."""
    rows = [{"id": f"{im.image_id:012d}_{k}", "image": str((out / "images" / f"{im.image_id:012d}_{k}.png").absolute()),
             "references": [str(im.path.absolute())], "captions": list(im.captions), "coco_id": im.image_id}
            for im in images for k in range(per_prompt)]
    return write_jsonl(out / "evaluation.jsonl", rows)


def table_row(clip_t: float, clip_i: float, n_images: int, method: str = "IP-Adapter (this run)") -> str:
    """A Table-1-style row beside the paper's IP-Adapter row."""
    head = "| Method | Images | CLIP-T | CLIP-I |\n| --- | --- | --- | --- |\n"
    paper = (f"| IP-Adapter (paper, Table 1) | {PAPER_IP_ADAPTER['images']} x {PER_PROMPT} | "
             f"{PAPER_IP_ADAPTER['clip_t']:.3f} | {PAPER_IP_ADAPTER['clip_i']:.3f} |\n")
    return head + paper + f"| {method} | {n_images} | {clip_t:.3f} | {clip_i:.3f} |"


def write_summary(out: Path, summary: dict) -> Path:
    return write_atomic(out / "summary.json", json.dumps(summary, indent=1, default=str))

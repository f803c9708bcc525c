"""A small, learnable synthetic image+caption dataset: one coloured shape on a plain background.

Written as PNGs with ``.txt`` captions beside them and the official training list, so the same folder
works as a caption folder and as ``data.json`` + image root.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")


@dataclasses.dataclass(frozen=True)
class SyntheticDataset:
    """Where :func:`write_synthetic_dataset` put things."""

    root: Path  # images, captions and face embeddings; also the image root of json_file
    json_file: Path
    num_images: int


def _draw(shape: str, colour, background, size: int, centre, radius: int) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    cx, cy = centre
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    return image


def write_synthetic_dataset(
    folder: str | Path,
    num_images: int = 16,
    *,
    size: int = 64,
    seed: int = 0,
    face_embeds: bool = False,
) -> SyntheticDataset:
    """Write ``num_images`` PNGs (``size`` px) with captions such as "a red circle on a blue background".

    With ``face_embeds`` each entry also gets an ``id_embed_file``: a unit 512-d ``.npy`` vector that is a
    fixed function of the shape and colour (a stand-in for an identity embedding).
    """
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    entries = []
    for i in range(num_images):
        shape = SHAPES[rng.integers(len(SHAPES))]
        fg, bg = rng.choice(len(names), size=2, replace=False)
        radius = int(rng.integers(size // 6, size // 3 + 1))
        centre = tuple(int(c) for c in rng.integers(radius, size - radius, size=2))
        image = _draw(shape, COLOURS[names[fg]], COLOURS[names[bg]], size, centre, radius)
        stem = f"{i:05d}"
        image.save(root / f"{stem}.png")
        caption = f"a {names[fg]} {shape} on a {names[bg]} background"
        (root / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
        entry = {"image_file": f"{stem}.png", "text": caption}
        if face_embeds:
            identity = np.random.default_rng([SHAPES.index(shape), int(fg)]).standard_normal(512)
            np.save(root / f"{stem}.npy", (identity / np.linalg.norm(identity)).astype(np.float32))
            entry["id_embed_file"] = f"{stem}.npy"
        entries.append(entry)
    json_file = root / "data.json"
    json_file.write_text(json.dumps(entries, indent=1), encoding="utf-8")
    return SyntheticDataset(root=root, json_file=json_file, num_images=num_images)

"""The exact attribute reader of the shapes world (NumPy, no learned model) and the toy CLIP-I / CLIP-T.

Reading: average each 2 x 2 cell, snap every cell to the nearest palette colour (each channel on or off),
take the background as the commonest colour of the border cells, the shape as the largest 4-connected group
of other cells, its colour as their commonest colour, its quadrant from their centroid and its kind from how
much of its bounding box it fills (square 1, circle about 0.75-0.85, triangle about 0.5). On a rendered scene
it returns the scene's attributes exactly (tested on every scene of the generator).

toy CLIP-I(generated, reference) = the fraction of the reference's image-only attributes (shape colour,
background, quadrant; the caption names none of them) that the generated image shows; chance level, for
a generator that ignores the reference, is (1/8 + 1/8 + 1/4) / 3 = 0.167. toy CLIP-T(generated, caption) =
whether the generated shape is the one the caption names (chance 1/3).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ipadapter_jax.world.scenes import CELL, COLOURS, GRID, PALETTE, QUADRANTS, SHAPES

IMAGE_ATTRIBUTES = ("colour", "background", "quadrant")  # carried by the image prompt only
CAPTION_ATTRIBUTES = ("shape",)
CHANCE_CLIP_I = (1 / len(COLOURS) + 1 / len(COLOURS) + 1 / len(QUADRANTS)) / 3
_CODES = {tuple(int(c > 127) for c in rgb): name for name, rgb in PALETTE.items()}
_SQUARE_FILL, _CIRCLE_FILL = 0.93, 0.66  # fill-ratio thresholds: above square; above circle; else triangle


def _cells(image) -> np.ndarray:
    """(GRID, GRID, 3) float cell means in [0, 1] of a world-sized image (other sizes are resized first)."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    im = im.convert("RGB")
    if im.size != (GRID * CELL, GRID * CELL):
        im = im.resize((GRID * CELL, GRID * CELL), Image.BILINEAR)
    x = np.asarray(im, np.float32) / 255.0
    return x.reshape(GRID, CELL, GRID, CELL, 3).mean(axis=(1, 3))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        stack, group = [start], []
        seen[start] = True
        while stack:
            y, x = stack.pop()
            group.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < GRID and 0 <= nx < GRID and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(group) > len(best):
            best = group
    out = np.zeros_like(mask)
    if best:
        out[tuple(np.array(best).T)] = True
    return out


def read_attributes(image) -> dict[str, str | None]:
    """{"shape", "colour", "background", "quadrant"} of an image; None where there is no shape to read."""
    on = _cells(image) > 0.5
    names = np.array([[_CODES[tuple(int(v) for v in on[y, x])] for x in range(GRID)] for y in range(GRID)])
    border = np.concatenate([names[0], names[-1], names[1:-1, 0], names[1:-1, -1]])
    background = Counter(border.tolist()).most_common(1)[0][0]
    blob = _largest_component(names != background)
    if not blob.any():
        return {"shape": None, "colour": None, "background": background, "quadrant": None}
    colour = Counter(names[blob].tolist()).most_common(1)[0][0]
    ys, xs = np.nonzero(blob)
    half = (GRID - 1) / 2
    quadrant = QUADRANTS[2 * int(ys.mean() > half) + int(xs.mean() > half)]
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = blob.sum() / box
    shape = SHAPES[1] if fill > _SQUARE_FILL else SHAPES[0] if fill > _CIRCLE_FILL else SHAPES[2]
    return {"shape": shape, "colour": colour, "background": background, "quadrant": quadrant}


def caption_attributes(caption: str) -> dict[str, str]:
    """The attributes a world caption names ("a circle" -> {"shape": "circle"})."""
    words = caption.lower().split()
    named = [s for s in SHAPES if s in words]
    if len(named) != 1:
        raise ValueError(f"{caption!r} is not a shapes-world caption (it must name one of {', '.join(SHAPES)}).")
    return {"shape": named[0]}


def toy_clip_i(generated: dict, reference: dict) -> float:
    """Fraction of the reference's image-only attributes the generated image shows."""
    return float(np.mean([generated[k] is not None and generated[k] == reference[k] for k in IMAGE_ATTRIBUTES]))


def toy_clip_t(generated: dict, caption: str) -> float:
    named = caption_attributes(caption)
    return float(np.mean([generated[k] == v for k, v in named.items()]))


def toy_metrics(generated: Sequence[dict], references: Sequence[dict], captions: Sequence[str]) -> dict[str, float]:
    """Means over items of toy CLIP-I (against the reference's attributes), toy CLIP-T (against the caption) and,
    per attribute, the fraction of generations that agree with the reference (`shape`: with the caption)."""
    named = [caption_attributes(c) for c in captions]
    out = {"clip_i": float(np.mean([toy_clip_i(g, r) for g, r in zip(generated, references, strict=True)])),
           "clip_t": float(np.mean([toy_clip_t(g, c) for g, c in zip(generated, captions, strict=True)]))}
    for k in IMAGE_ATTRIBUTES:
        out[k] = float(np.mean([g[k] == r[k] for g, r in zip(generated, references, strict=True)]))
    for k in CAPTION_ATTRIBUTES:
        out[k] = float(np.mean([g[k] == n[k] for g, n in zip(generated, named, strict=True)]))
    return out

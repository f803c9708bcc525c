"""Tiled references: a non-square or large reference image split into 256-px tiles, each its own image prompt
under an attention mask of its region (the regional-mask machinery), as ComfyUI_IPAdapter_plus' tiled adapter
defines it:

- aspect ratio W/H in [0.75, 1.33]: centre-cropped square, resized to 512x512, a 2x2 grid of tiles (a square-ish
  reference of at most 256 px is left whole: it is already one tile);
- otherwise: the short side resized to 256, the long side centre-cropped to at most 4 tiles (1024 px), and
  n = ceil(long / 256) tiles along it, overlapping by (n * 256 - long) / (n - 1).

A tile's mask is its box in the resized reference, stretched over the output image.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

TILE = 256
MAX_TILES = 4
SQUARE = (0.75, 1.33)


@dataclasses.dataclass(frozen=True)
class TileMask:
    """A tile's region: `box` (top, left, height, width) inside the resized reference of size `frame` (H, W)."""

    box: tuple[int, int, int, int]
    frame: tuple[int, int]

    def array(self) -> np.ndarray:
        top, left, height, width = self.box
        mask = np.zeros(self.frame, np.float32)
        mask[top:top + height, left:left + width] = 1.0
        return mask


def _starts(length: int, count: int) -> list[int]:
    overlap = (count * TILE - length) / (count - 1) if count > 1 else 0.0
    return [round(i * (TILE - overlap)) for i in range(count)]


def tile_layout(width: int, height: int) -> tuple[tuple[int, int, int, int], tuple[int, int], list[TileMask]] | None:
    """(crop box (left, top, right, bottom) of the original, resized (W, H), tiles), or None to keep it whole."""
    ratio = width / height
    if SQUARE[0] <= ratio <= SQUARE[1]:
        if max(width, height) <= TILE:
            return None
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        frame = (2 * TILE, 2 * TILE)
        tiles = [TileMask((y, x, TILE, TILE), frame) for y in (0, TILE) for x in (0, TILE)]
        return (left, top, left + side, top + side), frame[::-1], tiles
    wide = width > height
    short, long = (height, width) if wide else (width, height)
    resized_long = round(long * TILE / short)
    kept = min(resized_long, MAX_TILES * TILE)
    kept_original = round(kept * short / TILE) if kept < resized_long else long
    offset = (long - kept_original) // 2
    count = math.ceil(kept / TILE)
    if wide:
        crop, size = (offset, 0, offset + kept_original, height), (kept, TILE)
        tiles = [TileMask((0, s, TILE, TILE), (TILE, kept)) for s in _starts(kept, count)]
    else:
        crop, size = (0, offset, width, offset + kept_original), (TILE, kept)
        tiles = [TileMask((s, 0, TILE, TILE), (kept, TILE)) for s in _starts(kept, count)]
    return crop, size, tiles


def tile_reference(image: Image.Image) -> tuple[list[np.ndarray], list[TileMask]] | None:
    """The tiles (256x256x3 uint8) and their masks, or None when the reference stays whole."""
    layout = tile_layout(image.width, image.height)
    if layout is None:
        return None
    crop, size, masks = layout
    prepared = np.asarray(image.convert("RGB").crop(crop).resize(size, resample=Image.LANCZOS))
    tiles = [np.ascontiguousarray(prepared[t:t + h, x:x + w]) for t, x, h, w in (m.box for m in masks)]
    return tiles, masks

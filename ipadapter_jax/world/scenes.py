"""The shapes world: procedurally drawn scenes whose every attribute is known exactly.

A scene is one shape (circle, square or triangle) of one colour on a background of another colour, in one
quadrant, at one of two sizes. Colours are the eight corners of the RGB cube, so they stay far apart. Scenes
are drawn on a 16 x 16 grid of 2 x 2-pixel cells (32 x 32 px), so the world's VAE (`world.vae`), which
works on 2 x 2 blocks, reconstructs them exactly.

A scene's caption names the shape only ("a circle"): in adapter training, evaluation and the demo, colours and
position travel only in the image prompt. The world's base UNet alone is trained on descriptions that may name
the other attributes too (`describe`), as a real base learns "red" and "top left" from its captions: a frozen
base answers only what its cross-attention queries ask for, and it asks for colours and positions only if its
captions ever named them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image

GRID = 16  # cells per side
CELL = 2  # pixels per cell side
SIZE = GRID * CELL  # image side in pixels
PALETTE = {  # the corners of the RGB cube: a channel is either off or on
    "black": (0, 0, 0),
    "blue": (0, 0, 255),
    "green": (0, 255, 0),
    "cyan": (0, 255, 255),
    "red": (255, 0, 0),
    "magenta": (255, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
RADII = (2, 3)
_NEAR, _FAR = (4, 5), (10, 11)  # centre cells per half: a shape never touches the border or the other half


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    colour: str  # the shape's
    background: str
    quadrant: str
    radius: int  # cells
    centre: tuple[int, int]  # (row, column) cell

    @property
    def caption(self) -> str:
        return caption_for(self.shape)

    def attributes(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "background": self.background,
                "quadrant": self.quadrant}


def caption_for(shape: str) -> str:
    return f"a {shape}"


NAMEABLE = ("colour", "background", "quadrant")  # what `describe` may add to the caption


def describe(scene: Scene, named: frozenset[str] | set[str] = frozenset(NAMEABLE)) -> str:
    """The scene in words, naming the attributes in `named` beside the shape: "a red circle on blue at top left"."""
    unknown = set(named) - set(NAMEABLE)
    if unknown:
        raise ValueError(f"cannot name {sorted(unknown)}; nameable: {NAMEABLE}")
    words = ["a", *([scene.colour] if "colour" in named else []), scene.shape]
    if "background" in named:
        words += ["on", scene.background]
    if "quadrant" in named:
        words += ["at", scene.quadrant]
    return " ".join(words)


def shape_mask(shape: str, radius: int, centre: tuple[int, int]) -> np.ndarray:
    """(GRID, GRID) bool: the cells a shape covers."""
    dy, dx = np.mgrid[:GRID, :GRID]
    dy, dx = dy - centre[0], dx - centre[1]
    inside = (np.abs(dy) <= radius) & (np.abs(dx) <= radius)
    if shape == "circle":
        inside &= dy * dy + dx * dx <= radius * radius + radius
    elif shape == "triangle":  # apex up: a row's half-width grows by half a cell per row
        inside &= 2 * np.abs(dx) <= dy + radius
    elif shape != "square":
        raise ValueError(f"unknown shape {shape!r}")
    return inside


def random_scene(rng: np.random.Generator) -> Scene:
    fg, bg = rng.choice(len(COLOURS), size=2, replace=False)
    q = int(rng.integers(len(QUADRANTS)))
    rows, cols = (_NEAR, _FAR)[q // 2], (_NEAR, _FAR)[q % 2]
    return Scene(shape=SHAPES[int(rng.integers(len(SHAPES)))], colour=COLOURS[fg], background=COLOURS[bg],
                 quadrant=QUADRANTS[q], radius=int(rng.choice(RADII)),
                 centre=(int(rng.choice(rows)), int(rng.choice(cols))))


def render_cells(scene: Scene) -> np.ndarray:
    """(GRID, GRID, 3) uint8: one colour per cell."""
    cells = np.empty((GRID, GRID, 3), np.uint8)
    cells[:] = PALETTE[scene.background]
    cells[shape_mask(scene.shape, scene.radius, scene.centre)] = PALETTE[scene.colour]
    return cells


def render(scene: Scene) -> Image.Image:
    return Image.fromarray(np.repeat(np.repeat(render_cells(scene), CELL, 0), CELL, 1))


@dataclasses.dataclass(frozen=True)
class WorldDataset:
    """Where :func:`write_world_dataset` put things."""

    root: Path  # <i>.png, <i>.txt captions, data.json (the official training list), scenes.jsonl
    json_file: Path
    scenes: tuple[Scene, ...]

    def image(self, i: int) -> Path:
        return self.root / f"{i:05d}.png"


def write_world_dataset(folder: str | Path, num_images: int, *, seed: int = 0) -> WorldDataset:
    """Write ``num_images`` random scenes as PNGs with their captions, the official JSON list and each scene's
    exact attributes (``scenes.jsonl``)."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scenes = tuple(random_scene(rng) for _ in range(num_images))
    entries = []
    for i, scene in enumerate(scenes):
        render(scene).save(root / f"{i:05d}.png")
        (root / f"{i:05d}.txt").write_text(scene.caption + "\n", encoding="utf-8")
        entries.append({"image_file": f"{i:05d}.png", "text": scene.caption})
    (root / "scenes.jsonl").write_text("".join(json.dumps(dataclasses.asdict(s)) + "\n" for s in scenes))
    json_file = root / "data.json"
    json_file.write_text(json.dumps(entries, indent=1), encoding="utf-8")
    return WorldDataset(root=root, json_file=json_file, scenes=scenes)


EVAL_SCENES, EVAL_SEED = 64, 123  # the held-out scenes the toy metrics are measured on


def held_out_scenes(n: int = EVAL_SCENES, seed: int = EVAL_SEED):
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(n)]

"""Weight types: how one IP-Adapter weight spreads over the UNet's attention blocks (ComfyUI_IPAdapter_plus'
names and tables), and which layers the "precise" variants swap. Host-side NumPy; the result is one value per
cross-attention layer in the official order, which the UNet receives as traced scales.

The tables index `t`, the UNet's attention blocks (one `Transformer2DModel`, i.e. one `attentions.<j>` entry) in
execution order: down blocks, mid block, up blocks. SD1.5 has 16 of them and SDXL 11; one SDXL block holds
several transformer layers, which all take the block's weight. `t` is derived from
`UNetConfig.cross_attention_layers()`, the one definition of the layers.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ipadapter_jax.errors import UserError
from ipadapter_jax.models.unet_config import UNetConfig

SCALAR_TYPES = ("linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak middle",
                "weak output", "strong middle")
BLOCK_TYPES = ("style transfer", "composition", "strong style transfer", "style and composition",
               "strong style and composition", "style transfer precise", "composition precise")
WEIGHT_TYPES = SCALAR_TYPES + BLOCK_TYPES
PRECISE_TYPES = ("style transfer precise", "composition precise")
# the types that weight the composition blocks apart (with `composition_weight`) and may take a composition image
SEPARATE_COMPOSITION = ("style and composition", "strong style and composition", "style transfer precise",
                        "composition precise")
COMPOSITION_IMAGE_TYPES = ("style and composition", "strong style and composition")

# Block indices of the reference tables: the composition (layout) blocks and the style blocks.
_COMPOSITION = {"sdxl": (3,), "sd15": (4, 5)}
_STYLE = {"sdxl": (6,), "sd15": (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)}
_SIDES = ("down", "mid", "up")


def weight_type_name(name: str) -> str:
    """The canonical name ("ease in-out") of a weight type written with spaces, hyphens or underscores."""
    key = " ".join(str(name).lower().replace("_", " ").replace("-", " ").split())
    for canonical in WEIGHT_TYPES:
        if canonical.replace("-", " ") == key:
            return canonical
    raise UserError(f"weight type {name!r} is unknown; use one of: {', '.join(WEIGHT_TYPES)} (spaces, hyphens or "
                    "underscores alike).")


@dataclasses.dataclass(frozen=True)
class AttentionBlocks:
    """index: (n_layers,) block `t` of each cross-attention layer (official order); sides: "down", "mid" or "up"
    per block; base: "sd15" (SD1.x/2.x layout), "sdxl", or None for another layout."""

    index: np.ndarray
    sides: tuple[str, ...]
    base: str | None

    @property
    def count(self) -> int:
        return len(self.sides)


def attention_blocks(config: UNetConfig) -> AttentionBlocks:
    layers = config.cross_attention_layers()
    keys = sorted({(_SIDES.index(layer.side), layer.block, layer.attention) for layer in layers})
    position = {key: t for t, key in enumerate(keys)}
    index = np.asarray([position[(_SIDES.index(layer.side), layer.block, layer.attention)] for layer in layers])
    per_block: dict[tuple[int, int], int] = {}
    for side, block, _ in keys:
        per_block[(side, block)] = per_block.get((side, block), 0) + 1
    shape = tuple(per_block[k] for k in sorted(per_block))
    base = {(2, 2, 1, 3, 3): "sdxl", (2, 2, 2, 1, 3, 3, 3): "sd15"}.get(shape)
    return AttentionBlocks(index, tuple(_SIDES[side] for side, _, _ in keys), base)


def _scalar(kind: str, w: float, blocks: AttentionBlocks) -> np.ndarray:
    n = blocks.count
    t = np.arange(n, dtype=np.float64)
    side = np.asarray(blocks.sides)
    if kind == "linear":
        return np.full(n, w)
    if kind == "ease in":
        return w * (0.05 + 0.95 * (1 - t / n))
    if kind == "ease out":
        return w * (0.05 + 0.95 * (t / n))
    if kind == "ease in-out":
        return w * (0.05 + 0.95 * (1 - np.abs(t - n / 2) / (n / 2)))
    if kind == "reverse in-out":
        return w * (0.05 + 0.95 * (np.abs(t - n / 2) / (n / 2)))
    weak = {"weak input": ("down",), "weak middle": ("mid",), "weak output": ("up",),
            "strong middle": ("down", "up")}[kind]
    return np.where(np.isin(side, weak), 0.2 * w, w)


def _block_table(kind: str, w: float, wc: float, blocks: AttentionBlocks) -> dict[int, float]:
    """The reference's dictionary types: {block t: weight}; blocks left out get no image prompt."""
    base = blocks.base
    style, comp = _STYLE[base], _COMPOSITION[base]
    every = range(blocks.count)
    if kind == "style transfer":
        return dict.fromkeys(style, w)
    if kind == "strong style transfer":
        return {t: w for t in every if t not in comp}
    if kind == "composition":
        return {4: 0.25 * w, 5: w} if base == "sd15" else {3: w}
    # the types below weight the composition blocks with wc and the others with w
    composition = {4: 0.25 * wc, 5: wc} if base == "sd15" else {3: wc}
    if kind in ("style and composition", "style transfer precise"):
        return {**dict.fromkeys(style, w), **composition}
    if kind == "strong style and composition":
        return {**dict.fromkeys(every, w), **dict.fromkeys(comp, wc)}
    if kind == "composition precise":
        rest = (6, 7, 8) if base == "sd15" else tuple(t for t in every if t not in style + comp)
        return {**dict.fromkeys(rest, 0.1 * w), **dict.fromkeys(style, w), **composition}
    raise AssertionError(kind)


def parse_layer_weights(text: str | dict) -> dict[int, float]:
    """"i:v,i:v,..." (or a dict) -> {block t: v}."""
    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = [part.split(":") for part in str(text).replace(" ", "").split(",") if part]
    try:
        return {int(i): float(v) for i, v in items}
    except (TypeError, ValueError):
        raise UserError(f"layer weights {text!r} must be block:weight pairs such as '0:1.0,6:0.5'.") from None


def block_weights(weight_type: str, weight: float, config: UNetConfig, *, composition_weight: float | None = None,
                  layer_weights: str | dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(weights, swap): (n_layers,) float32 weight of each cross-attention layer, and 1 on the layers whose image
    branches a precise type swaps. `composition_weight` (default `weight`) weights the composition blocks of the
    types that weight them apart; `layer_weights` {t: v} gives {t: v * weight} instead of the type's table."""
    kind = weight_type_name(weight_type)
    blocks = attention_blocks(config)
    w = float(weight)
    wc = w if composition_weight is None else float(composition_weight)
    if blocks.base is None and kind in BLOCK_TYPES:
        raise UserError(f"the {kind!r} weight type is defined for SD1.5- and SDXL-shaped UNets (16 or 11 attention "
                        f"blocks), but this UNet has {blocks.count}; use a scalar weight type, layer weights or a "
                        "scale dict instead.")
    if layer_weights is not None:
        table = parse_layer_weights(layer_weights)
        bad = [t for t in table if not 0 <= t < blocks.count]
        if bad:
            raise UserError(f"layer weights name block {bad[0]}, but this UNet's attention blocks are numbered 0 to "
                            f"{blocks.count - 1}.")
        per_block = np.zeros(blocks.count)
        for t, v in table.items():
            per_block[t] = v * w
    elif kind in SCALAR_TYPES:
        per_block = _scalar(kind, w, blocks)
    else:
        per_block = np.zeros(blocks.count)
        for t, v in _block_table(kind, w, wc, blocks).items():
            per_block[t] = v
    swap = np.zeros(blocks.count, np.float32)
    if kind in PRECISE_TYPES:
        comp = np.isin(np.arange(blocks.count), _COMPOSITION[blocks.base])
        swap = (comp if kind == "style transfer precise" else ~comp).astype(np.float32)
    return per_block[blocks.index].astype(np.float32), swap[blocks.index]


def composition_layers(config: UNetConfig) -> np.ndarray:
    """(n_layers,) 1 on the composition block's layers, where a composition image replaces the conditional
    tokens; SDXL-shaped UNets only (as in the reference)."""
    blocks = attention_blocks(config)
    if blocks.base != "sdxl":
        raise UserError("a composition image works on SDXL-shaped UNets only (its composition block); drop "
                        "composition_images (--composition-image) for this UNet.")
    return np.isin(blocks.index, _COMPOSITION["sdxl"]).astype(np.float32)

"""Per-adapter image-prompt settings and their host-side preparation: layer scales (float, per layer, per block
in diffusers' dict form, InstantStyle presets), weight types, embeds scaling, several reference images and how
their embeddings combine, negative images (or negative noise), regional masks, tiled references, composition
images, and precomputed embeddings saved to and loaded from `.npz`."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from ipadapter_jax.errors import UserError
from ipadapter_jax.images import binary_mask, load_image
from ipadapter_jax.models.adapter_spec import IMAGE_EMBEDS, NO_IMAGE, PENULTIMATE
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.pipelines.negative_noise import negative_noise_image, parse_negative_noise
from ipadapter_jax.pipelines.tiles import TileMask, tile_reference
from ipadapter_jax.pipelines.weight_types import (
    COMPOSITION_IMAGE_TYPES,
    SEPARATE_COMPOSITION,
    block_weights,
    parse_layer_weights,
    weight_type_name,
)

COMBINE_MODES = ("concat", "average", "norm_average", "add", "subtract", "max", "min")
EMBEDS_SCALING = ("v", "kv", "kv-penalty", "kv-mean-penalty")
_SCALING_ALIASES = {"v only": "v", "k+v": "kv", "k+v w/ c penalty": "kv-penalty",
                    "k+mean(v) w/ c penalty": "kv-mean-penalty"}
TILES = (None, "off", "auto")
# the controls a batch manifest item sets for all its adapters (composition_images are per adapter, as images)
CONTROL_DEFAULTS = {"weight_type": "linear", "composition_weight": None, "layer_weights": None,
                    "embeds_scaling": "v", "negative_noise": None, "tiles": None}

# InstantStyle (arXiv 2404.02733): inject only into the style block, optionally plus the layout block. They are the
# weight types of the same meaning at weight 1 (pipelines/weight_types.py holds the one table).
PRESETS: dict[str, str] = {"style": "style transfer", "style_and_layout": "style and composition"}

Scale = float | list | dict | str


@dataclasses.dataclass
class ImagePrompt:
    """What one adapter sees in one generation.

    images: reference images (paths, PIL images or arrays); several are concatenated as tokens unless
        `combine` merges their embeddings first (average, norm_average, add, subtract = first minus the mean
        of the others, max, min; see `combine_features`).
    face_embeds: (N, 512) InsightFace embeddings for FaceID adapters (e.g. loaded from `.npy`).
    negative_images: images for the unconditional branch instead of the official path (zero embeddings for
        base adapters, the encoder on an all-zero image for Plus).
    embeds: precomputed (negative, positive) features, e.g. from `load_image_embeds`; skips the encoder.
    scale: a float, a list (per layer in official order, or per masked image), diffusers' dict form
        ({"down": {"block_2": [0.0, 1.0]}, "up": {...}, "mid": 0.5}; unlisted blocks are 0), or a preset name
        ("style" = weight type "style transfer" at 1, "style_and_layout" = "style and composition" at 1).
    masks: one mask per image (white = where this image acts), for regional prompting.
    shortcut, shortcut_scale: FaceID-PlusV2's `out = id_tokens + s_scale * perceiver(...)`.
    weight_type: how a float `scale` spreads over the attention blocks (pipelines/weight_types.py: linear, ease in,
        ..., style transfer, composition, ..., composition precise; spaces, hyphens or underscores).
    composition_weight: the composition blocks' weight in the types that weight them apart (default: `scale`).
    layer_weights: "t:v,t:v,..." (or {t: v}): block t gets v * scale, the others nothing (overrides the type's
        table; a precise type still swaps its branches).
    composition_images: SDXL, "style and composition" types: their tokens replace the conditional ones on the
        composition block.
    embeds_scaling: "v" (the paper's), "kv", "kv-penalty" or "kv-mean-penalty" (pipelines/layer_controls.py).
    negative_noise: "fade", "dissolve", "gaussian" or "shuffle", optionally ":strength": the unconditional image is
        made from noise (on the first negative image, or a black one); pipelines/negative_noise.py.
    tiles: "auto" splits a non-square or large reference into 256-px tiles, each masked to its region.
    """

    images: list | None = None
    face_embeds: np.ndarray | None = None
    negative_images: list | None = None
    embeds: tuple[np.ndarray, np.ndarray] | None = None
    scale: Scale = 1.0
    masks: list | None = None
    combine: str = "concat"
    shortcut: bool = False
    shortcut_scale: float = 1.0
    weight_type: str = "linear"
    composition_weight: float | None = None
    layer_weights: str | dict | None = None
    composition_images: list | None = None
    embeds_scaling: str = "v"
    negative_noise: str | None = None
    tiles: str | None = None

    def __post_init__(self):
        for name in ("images", "negative_images", "masks", "composition_images"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (list, tuple)):
                setattr(self, name, [value])
        if self.combine not in COMBINE_MODES:
            raise UserError(f"combine mode {self.combine!r} is unknown; use one of {', '.join(COMBINE_MODES)}.")
        self.weight_type = weight_type_name(self.weight_type)
        self.embeds_scaling = embeds_scaling_name(self.embeds_scaling)
        if self.composition_images and self.weight_type not in COMPOSITION_IMAGE_TYPES:
            raise UserError(f"a composition image needs weight type {' or '.join(map(repr, COMPOSITION_IMAGE_TYPES))}, "
                            f"not {self.weight_type!r}.")
        if self.composition_weight is not None and self.weight_type not in SEPARATE_COMPOSITION:
            raise UserError(f"composition_weight applies to the weight types {', '.join(SEPARATE_COMPOSITION)}; "
                            f"{self.weight_type!r} has no separate composition weight.")
        if self.layer_weights is not None:
            parse_layer_weights(self.layer_weights)
        if self.negative_noise is not None:
            parse_negative_noise(self.negative_noise)
        if self.tiles not in TILES:
            raise UserError(f"tiles {self.tiles!r} is unknown; use 'auto' (or leave it off).")
        if self.tiles == "auto":
            self._tile()
        if self.masks is not None and self.combine != "concat":
            raise UserError("masks give each reference image its own region, so they cannot be combined with "
                            f"combine={self.combine!r}; use combine='concat' (the default) with masks.")

    def _tile(self) -> None:
        """Replace the reference by its tiles and their region masks (once: tiles already made stay)."""
        if self.masks and all(isinstance(m, TileMask) for m in self.masks):
            return
        if self.masks or self.combine != "concat" or self.composition_images:
            raise UserError("tiles give each tile its own region, so they do not go with masks, combine modes or "
                            "composition images; drop tiles or those.")
        if not self.images or len(self.images) != 1:
            raise UserError(f"tiles split one reference image; give exactly one, not {len(self.images or [])}.")
        tiled = tile_reference(load_image(self.images[0], what="reference image"))
        if tiled is not None:
            self.images, self.masks = tiled

    @property
    def num_images(self) -> int:
        if self.embeds is not None:
            return int(np.asarray(self.embeds[1]).shape[0])
        if self.images:
            return len(self.images)
        return 0 if self.face_embeds is None else int(np.atleast_2d(self.face_embeds).shape[0])

    def loaded_images(self):
        return [load_image(i, what="reference image") for i in self.images or []]

    def loaded_composition_images(self):
        return [load_image(i, what="composition image") for i in self.composition_images or []]

    def unconditional_images(self) -> list | None:
        """The images of the unconditional branch: the negative images, or the negative-noise image made from the
        first of them (or from a black 224x224 image); None for the official negative branch."""
        negatives = [load_image(i, what="negative image") for i in self.negative_images or []]
        if self.negative_noise is None:
            return negatives or None
        kind, strength = parse_negative_noise(self.negative_noise)
        source = np.asarray(negatives[0], np.float32) / 255 if negatives else None
        return [load_image(negative_noise_image(kind, strength, source))]


def embeds_scaling_name(name: str) -> str:
    key = str(name).strip().lower()
    key = _SCALING_ALIASES.get(key, key.replace("_", "-"))
    if key not in EMBEDS_SCALING:
        raise UserError(f"embeds scaling {name!r} is unknown; use one of {', '.join(EMBEDS_SCALING)}.")
    return key


def per_adapter(values: list, n: int, what: str, *, once: bool = True) -> list:
    """One entry per IP-Adapter from `values` given once per adapter, or (`once`) a single one for all of them."""
    if once and len(values) == 1:
        return list(values) * n
    if len(values) != n:
        either = " (or one for all)" if once else ""
        raise UserError(f"{what} needs one entry per IP-Adapter ({n}){either}, got {len(values)}.")
    return list(values)


def combine_features(features: np.ndarray, mode: str, axis: int = 0) -> np.ndarray:
    """Merge N reference embeddings (along `axis`) into one, keeping the axis (size 1); elementwise over the
    features: average, add, subtract (the first minus the mean of the others), max, min, and norm_average (the mean
    of e / ||e|| with the norm taken over the N embeddings, per feature)."""
    features = np.asarray(features, np.float32)
    if mode == "concat" or features.shape[axis] == 1:
        return features
    if mode == "average":
        return np.mean(features, axis=axis, keepdims=True)
    if mode == "add":
        return np.sum(features, axis=axis, keepdims=True)
    if mode == "subtract":
        first = np.take(features, np.asarray([0]), axis=axis)
        rest = np.take(features, np.arange(1, features.shape[axis]), axis=axis)
        return first - np.mean(rest, axis=axis, keepdims=True)
    if mode == "max":
        return np.max(features, axis=axis, keepdims=True)
    if mode == "min":
        return np.min(features, axis=axis, keepdims=True)
    if mode == "norm_average":
        norms = np.sqrt(np.sum(features * features, axis=axis, keepdims=True))
        unit = features / np.where(norms > 0, norms, np.float32(1))  # a feature that is 0 in every embedding stays 0
        return np.mean(unit, axis=axis, keepdims=True)
    raise UserError(f"combine mode {mode!r} is unknown; use one of {', '.join(COMBINE_MODES)}.")


def _attention_blocks(config: UNetConfig) -> dict[str, dict[int, int]]:
    """{"down": {block: number of attentions}, "up": {...}} for blocks with cross-attention."""
    blocks: dict[str, dict[int, set]] = {"down": {}, "up": {}}
    for layer in config.cross_attention_layers():
        if layer.side != "mid":
            blocks[layer.side].setdefault(layer.block, set()).add(layer.attention)
    return {side: {b: len(a) for b, a in found.items()} for side, found in blocks.items()}


def _expand_dict(scale: dict, config: UNetConfig) -> dict[str, Any]:
    """diffusers' dict form -> {"down_blocks.i.attentions.j": value, "mid_block": value}; unlisted blocks 0."""
    unknown = set(scale) - {"down", "mid", "up"}
    if unknown:
        raise UserError(f"IP-Adapter scale dict has unknown keys {sorted(unknown)}; use 'down', 'mid' and 'up'.")
    blocks = _attention_blocks(config)
    out: dict[str, Any] = {}
    mid = scale.get("mid", 0.0)
    if isinstance(mid, list):
        if len(mid) != 1:
            raise UserError(f"IP-Adapter scale for 'mid' takes one value, got {len(mid)}.")
        mid = mid[0]
    out["mid_block"] = mid
    for side in ("down", "up"):
        value = scale.get(side, 0.0)
        if not isinstance(value, dict):
            value = {f"block_{i}": value for i in blocks[side]}
        for name in value:
            index = int(name.removeprefix("block_")) if name.startswith("block_") and name[6:].isdigit() else None
            if index not in blocks[side]:
                raise UserError(f"IP-Adapter scale names {side}.{name}, but this UNet's {side} blocks with "
                                f"attention are {', '.join(f'block_{i}' for i in blocks[side])}.")
        for i, count in blocks[side].items():
            v = value.get(f"block_{i}", 0.0)
            values = v if isinstance(v, list) else [v] * count
            if len(values) == 1:
                values = values * count
            if len(values) != count:
                raise UserError(f"IP-Adapter scale for {side}.block_{i} needs {count} value(s) (one per attention "
                                f"module), got {len(values)}.")
            for j, vj in enumerate(values):
                out[f"{side}_blocks.{i}.attentions.{j}"] = vj
    return out


def layer_scales(scale: Scale, config: UNetConfig, num_masked_images: int | None = None) -> np.ndarray:
    """An adapter's scale per cross-attention layer in official order: (n_layers,), or (n_layers, N) when its
    N images have masks (each image may then have its own scale)."""
    paths = [layer.path for layer in config.cross_attention_layers()]
    n = len(paths)
    if isinstance(scale, str):
        if scale not in PRESETS:
            raise UserError(f"IP-Adapter scale preset {scale!r} is unknown; use one of {', '.join(PRESETS)}.")
        values = block_weights(PRESETS[scale], 1.0, config)[0].tolist()
    elif isinstance(scale, dict):
        per_block = _expand_dict(scale, config)
        values = [next(v for prefix, v in per_block.items() if p.startswith(prefix + ".")) for p in paths]
    elif isinstance(scale, (list, tuple, np.ndarray)) and num_masked_images is None:
        values = [float(s) for s in _finite(scale).reshape(-1)]
        if len(values) != n:
            raise UserError(f"a list of IP-Adapter scales needs one value per cross-attention layer ({n} for "
                            f"this UNet), got {len(values)}; or pass a float or a dict per block.")
    else:
        values = [scale] * n
    width = num_masked_images
    out = np.zeros((n,) if width is None else (n, width), np.float32)
    for i, v in enumerate(values):
        v = _finite(v)
        if width is None:
            if v.ndim:
                raise UserError("per-image IP-Adapter scales (a list per layer) need masks, one per image.")
            out[i] = v
        else:
            if v.ndim and v.shape[0] != width:
                raise UserError(f"this adapter has {width} masked images but a scale list of {v.shape[0]}.")
            out[i] = v
    return out


def _finite(value) -> np.ndarray:
    try:
        array = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        raise UserError(f"IP-Adapter scales must be numbers, not {value!r}.") from None
    if not np.isfinite(array).all():
        raise UserError(f"IP-Adapter scales must be finite numbers, not {value!r}.")
    return array.astype(np.float32)


def ip_masks(masks: list, height: int, width: int) -> np.ndarray:
    """(N, H, W) binary masks at output resolution (diffusers' IPAdapterMaskProcessor: grayscale, Lanczos,
    threshold 0.5)."""
    return np.stack([binary_mask(m.array() if isinstance(m, TileMask) else m, height, width) for m in masks])


def save_image_embeds(path: str | os.PathLike, embeds: list[tuple[np.ndarray, np.ndarray]],
                      specs: list) -> Path:
    """Write per-adapter (negative, positive) features to `.npz` (atomically), with each adapter's variant."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    for a, ((neg, pos), spec) in enumerate(zip(embeds, specs, strict=True)):
        arrays[f"adapter_{a}_negative"] = np.asarray(neg)
        arrays[f"adapter_{a}_positive"] = np.asarray(pos)
        arrays[f"adapter_{a}_variant"] = np.asarray(spec.variant)
        arrays[f"adapter_{a}_feature"] = np.asarray(spec.image_feature)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_image_embeds(path: str | os.PathLike, specs: list) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-adapter (negative, positive) features saved by `save_image_embeds`, checked against the adapters."""
    path = Path(path)
    fix = "recompute them with --save-embeds"
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a saved image-embeddings file; {fix}.")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path} is not a saved image-embeddings file ({e}); {fix}.") from None
    out = []
    for a, spec in enumerate(specs):
        key = f"adapter_{a}_positive"
        if key not in arrays or f"adapter_{a}_negative" not in arrays:
            raise UserError(f"{path} holds embeddings for fewer adapters than the {len(specs)} loaded; {fix}.")
        variant = str(arrays.get(f"adapter_{a}_variant", ""))
        if variant != spec.variant or str(arrays.get(f"adapter_{a}_feature", "")) != spec.image_feature:
            raise UserError(f"{path} was saved for a {variant or 'unknown'} adapter in slot {a}, but a {spec.variant} "
                            f"adapter is loaded there; {fix}.")
        pair = (arrays[f"adapter_{a}_negative"], arrays[key])
        rank = {IMAGE_EMBEDS: 2, PENULTIMATE: 3, NO_IMAGE: 2}[spec.image_feature]
        width = spec.image_feature_dim
        for x in pair:
            if (not np.issubdtype(x.dtype, np.floating) or x.ndim != rank or x.shape[-1] != width
                    or not np.isfinite(x).all()):
                raise UserError(f"{path} holds {x.dtype} embeddings of shape {x.shape} for slot {a}, not finite "
                                f"{rank}-d features of width {width} as the {spec.variant} adapter reads; {fix}.")
        out.append(pair)
    return out

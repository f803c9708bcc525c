"""Per-adapter image-prompt settings and their host-side preparation: layer scales (float, per layer, per block
in diffusers' dict form, InstantStyle presets), several reference images and how their embeddings combine,
negative images, regional masks, and precomputed embeddings saved to and loaded from `.npz`."""

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

COMBINE_MODES = ("concat", "average", "norm_average", "add", "subtract")

# InstantStyle (arXiv 2404.02733): inject only into the style block, optionally plus the layout block (SDXL).
PRESETS: dict[str, dict] = {
    "style": {"up": {"block_0": [0.0, 1.0, 0.0]}},
    "style_and_layout": {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}},
}

Scale = float | list | dict | str


@dataclasses.dataclass
class ImagePrompt:
    """What one adapter sees in one generation.

    images: reference images (paths, PIL images or arrays); several are concatenated as tokens unless
        `combine` merges their embeddings first (average, norm_average, add, subtract = first minus the mean
        of the others).
    face_embeds: (N, 512) InsightFace embeddings for FaceID adapters (e.g. loaded from `.npy`).
    negative_images: images for the unconditional branch instead of the official path (zero embeddings for
        base adapters, the encoder on an all-zero image for Plus).
    embeds: precomputed (negative, positive) features, e.g. from `load_image_embeds`; skips the encoder.
    scale: a float, a list (per layer in official order, or per masked image), diffusers' dict form
        ({"down": {"block_2": [0.0, 1.0]}, "up": {...}, "mid": 0.5}; unlisted blocks are 0), or a preset name
        ("style", "style_and_layout"; SDXL-shaped UNets).
    masks: one mask per image (white = where this image acts), for regional prompting.
    shortcut, shortcut_scale: FaceID-PlusV2's `out = id_tokens + s_scale * perceiver(...)`.
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

    def __post_init__(self):
        if self.images is not None and not isinstance(self.images, (list, tuple)):
            self.images = [self.images]
        if self.negative_images is not None and not isinstance(self.negative_images, (list, tuple)):
            self.negative_images = [self.negative_images]
        if self.masks is not None and not isinstance(self.masks, (list, tuple)):
            self.masks = [self.masks]
        if self.combine not in COMBINE_MODES:
            raise UserError(f"combine mode {self.combine!r} is unknown; use one of {', '.join(COMBINE_MODES)}.")
        if self.masks is not None and self.combine != "concat":
            raise UserError("masks give each reference image its own region, so they cannot be combined with "
                            f"combine={self.combine!r}; use combine='concat' (the default) with masks.")

    @property
    def num_images(self) -> int:
        if self.embeds is not None:
            return int(np.asarray(self.embeds[1]).shape[0])
        if self.images:
            return len(self.images)
        return 0 if self.face_embeds is None else int(np.atleast_2d(self.face_embeds).shape[0])

    def loaded_images(self):
        return [load_image(i, what="reference image") for i in self.images or []]


def per_adapter(values: list, n: int, what: str, *, once: bool = True) -> list:
    """One entry per IP-Adapter from `values` given once per adapter, or (`once`) a single one for all of them."""
    if once and len(values) == 1:
        return list(values) * n
    if len(values) != n:
        either = " (or one for all)" if once else ""
        raise UserError(f"{what} needs one entry per IP-Adapter ({n}){either}, got {len(values)}.")
    return list(values)


def combine_features(features: np.ndarray, mode: str, axis: int = 0) -> np.ndarray:
    """Merge N reference embeddings (along `axis`) into one, keeping the axis (size 1)."""
    xp = np
    features = np.asarray(features, np.float32)
    if mode == "concat" or features.shape[axis] == 1:
        return features
    if mode == "average":
        return xp.mean(features, axis=axis, keepdims=True)
    if mode == "add":
        return xp.sum(features, axis=axis, keepdims=True)
    if mode == "subtract":
        first = xp.take(features, xp.asarray([0]), axis=axis)
        rest = xp.take(features, xp.arange(1, features.shape[axis]), axis=axis)
        return first - xp.mean(rest, axis=axis, keepdims=True)
    if mode == "norm_average":  # mean of unit directions, rescaled to the mean length
        feature_axes = tuple(range(axis + 1, features.ndim))
        norms = xp.sqrt(xp.sum(features * features, axis=feature_axes, keepdims=True))
        unit = features / xp.maximum(norms, 1e-12)
        return xp.mean(unit, axis=axis, keepdims=True) * xp.mean(norms, axis=axis, keepdims=True)
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
        blocks = _attention_blocks(config)
        if 0 not in blocks["up"] or len(config.block_out_channels) != 3 or blocks["up"][0] != 3:
            raise UserError(f"the {scale!r} preset (InstantStyle) is defined for SDXL-shaped UNets; pass a scale "
                            "dict for this UNet instead.")
        scale = PRESETS[scale]
    if isinstance(scale, dict):
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
    return np.stack([binary_mask(m, height, width) for m in masks])


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

"""LoRA files for the base model (UNet and text encoders), fused into the frozen weights at load time.

    fuse_loras(unet, text_encoders, [(path, weight), ...]) -> {"unet": n, "text_encoder": m, ...}
    read_lora(path, models) -> list[LoraLayer]          parsed and resolved, nothing changed

Each adapted layer gets W += weight * (alpha / rank) * up @ down (alpha = rank when the file has none), in
float32, stored back in the layer's dtype and sharding; several files add up. Formats: diffusers/PEFT (also the
older diffusers spellings and `lora_adapter_metadata` alphas) and kohya/A1111 with LoCon convolutions; see
`lora_keys`. Every key must adapt a layer of the given models, or nothing is changed and the key is named.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.errors import UserError
from ipadapter_jax.weights.checkpoint_files import open_file
from ipadapter_jax.weights.lora_keys import TARGETS, ModuleIndex, module_index, parse_key, unsupported_method
from ipadapter_jax.weights.safetensors_io import SafetensorsFile


@dataclasses.dataclass(frozen=True)
class LoraLayer:
    target: str  # "unet", "text_encoder" or "text_encoder_2"
    path: str  # our dotted module path
    down: np.ndarray  # PyTorch layout: (rank, in) or (rank, in, kh, kw)
    up: np.ndarray  # (out, rank) or (out, rank, 1, 1)
    scale: float  # alpha / rank
    key: str  # the file's key for `down`, for messages


def _name(source) -> str:
    return os.fspath(source) if isinstance(source, str | os.PathLike) else "the LoRA state dict"


def _metadata_alphas(metadata: Mapping[str, str], target: str):
    """From diffusers' `lora_adapter_metadata` (PEFT LoraConfig fields per component): a function
    (module path, rank) -> scale, "DoRA" for a DoRA adapter, or None when the file has no such metadata."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    config = json.loads(raw)
    prefix = f"{target}."
    fields = {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}
    if not fields:
        return None
    if fields.get("use_dora"):
        return "DoRA"
    default, patterns = fields.get("lora_alpha"), fields.get("alpha_pattern") or {}

    def alpha(module: str, rank: int) -> float:
        for pattern, value in patterns.items():  # PEFT's matching: the pattern ends the module name
            if re.match(rf"(.*\.)?({pattern})$", module):
                return float(value) / (math.sqrt(rank) if fields.get("use_rslora") else rank)
        value = default if default is not None else rank
        return float(value) / (math.sqrt(rank) if fields.get("use_rslora") else rank)

    return alpha


def _as_matrices(down: np.ndarray, up: np.ndarray, kernel_shape: tuple, key: str, source: str):
    """down/up as (rank, in[, kh, kw]) and (out, rank) for a layer with this Flax kernel shape, or a UserError.
    Linear layers also take 1x1 conv factors, 1x1 convs plain matrices (kohya stores either)."""
    linear = len(kernel_shape) == 2
    n_in, n_out = kernel_shape if linear else kernel_shape[2:]
    kh, kw = (1, 1) if linear else kernel_shape[:2]
    if up.ndim == 4 and up.shape[2:] == (1, 1):
        up = up[:, :, 0, 0]
    if down.ndim == 4 and linear and down.shape[2:] == (1, 1):
        down = down[:, :, 0, 0]
    if down.ndim == 2 and not linear and (kh, kw) == (1, 1):
        down = down[:, :, None, None]
    rank = up.shape[1] if up.ndim == 2 else -1
    if up.ndim != 2 or up.shape[0] != n_out or down.shape != ((rank, n_in) if linear else (rank, n_in, kh, kw)):
        raise UserError(f"{source}: LoRA {key} has down {tuple(down.shape)} and up {tuple(up.shape)} but its layer "
                        f"takes {n_in} -> {n_out} channels{'' if linear else f' with a {kh}x{kw} kernel'}; this "
                        "LoRA was trained for another base model.")
    return down, up


def read_lora(source, models: Mapping[str, nnx.Module], *, indexes: dict[str, ModuleIndex] | None = None
              ) -> list[LoraLayer]:
    """Every layer a LoRA file (or a name -> array state dict) adapts, resolved against `models`
    (keys of `TARGETS`). Raises a `UserError` naming the first key that adapts nothing."""
    name = _name(source)
    if isinstance(source, str | os.PathLike):
        file = Path(source)
        state = SafetensorsFile(file) if file.suffix == ".safetensors" else open_file(file)
    else:
        state = source
    metadata = getattr(state, "metadata", None) or {}
    indexes = {} if indexes is None else indexes  # filled here, shared with the caller
    groups: dict[tuple[str, str], dict[str, str]] = {}
    refs = {}
    for key in state:
        refs[key] = ref = parse_key(key)
        if ref is None:
            method = unsupported_method(key)
            what = f"{method} weights, which are not supported" if method else "not a LoRA weight of a known format"
            raise UserError(f"{name}: key {key!r} is {what}; use a LoRA in the diffusers/PEFT or kohya format.")
    absent = next((key for key, ref in refs.items() if ref.target not in models), None)
    # The UNet first: a LoRA for another base model is best told by its UNet layers.
    for key, ref in sorted(refs.items(), key=lambda item: TARGETS.index(item[1].target)):
        if ref.target not in models:
            continue
        if ref.target not in indexes:
            indexes[ref.target] = module_index(models[ref.target], ref.target)
        path = indexes[ref.target].resolve(ref)
        if path == "":
            raise UserError(f"{name}: key {key!r} names more than one {ref.target} layer; rename it with dots.")
        if path is None:
            raise UserError(f"{name}: key {key!r} matches no layer of the {ref.target}; the LoRA is for another "
                            "base model or in an unsupported layout.")
        parts = groups.setdefault((ref.target, path), {})
        if ref.part in parts:
            raise UserError(f"{name}: keys {parts[ref.part]!r} and {key!r} both set the {ref.part} of {path}.")
        parts[ref.part] = key

    layers, alphas = [], {t: _metadata_alphas(metadata, t) for t in TARGETS}
    for (target, path), parts in groups.items():  # in TARGETS order, as filled
        if "down" not in parts or "up" not in parts:
            missing = "up" if "down" in parts else "down"
            raise UserError(f"{name}: the {target} layer {path} has no {missing} weight "
                            f"(from {next(iter(parts.values()))!r}); the file is incomplete.")
        if alphas[target] == "DoRA":
            raise UserError(f"{name}: the {target} adapter is DoRA, which is not supported; use a plain LoRA.")
        down = np.asarray(state[parts["down"]], np.float32)
        up = np.asarray(state[parts["up"]], np.float32)
        kernel_shape = tuple(indexes[target].modules[path].kernel.shape)
        down, up = _as_matrices(down, up, kernel_shape, parts["down"], name)
        rank = down.shape[0]
        if "alpha" in parts:
            scale = float(np.asarray(state[parts["alpha"]], np.float32).reshape(())) / rank
        elif alphas[target] is not None:
            scale = alphas[target](path, rank)
        else:
            scale = 1.0
        layers.append(LoraLayer(target, path, down, up, scale, parts["down"]))
    if absent is not None:
        target = refs[absent].target
        raise UserError(f"{name} adapts the {target} ({absent!r}) but no {target} was given; pass the pipeline's "
                        "text encoders too.")
    return layers


def _delta(layer: LoraLayer, kernel_shape: tuple) -> np.ndarray:
    """up @ down in our layout (a Linear's [in, out] or a Conv2d's HWIO), float32 on the host: one small
    product per layer, not worth a device compilation per shape."""
    if len(kernel_shape) == 2:
        return layer.down.T @ layer.up.T
    return np.tensordot(layer.down, layer.up, axes=([0], [1])).transpose(1, 2, 0, 3)  # (i, h, w, o) -> HWIO


@jax.jit
def _add(kernel: jax.Array, delta: jax.Array) -> jax.Array:
    return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def fuse_loras(unet: nnx.Module, text_encoders: Sequence[nnx.Module] = (),
               loras: Sequence[tuple[str | os.PathLike | Mapping, float]] = ()) -> dict[str, int]:
    """Fuse LoRA files into the UNet and text encoders (SDXL: both, in pipeline order), each with its weight.

    All files are read and checked first, so a bad file changes nothing. Returns the adapted layers per model.
    """
    if len(text_encoders) > 2:
        raise ValueError("pass at most two text encoders (text_encoder, text_encoder_2)")
    models = {"unet": unet, **{TARGETS[1 + i]: te for i, te in enumerate(text_encoders)}}
    indexes: dict[str, ModuleIndex] = {}
    layers: dict[tuple[str, str], list[tuple[float, LoraLayer]]] = {}
    for source, weight in loras:  # read and check everything before changing anything
        for layer in read_lora(source, models, indexes=indexes):
            layers.setdefault((layer.target, layer.path), []).append((float(weight), layer))
    counts = dict.fromkeys(models, 0)
    for (target, path), adapters in layers.items():  # one full-size delta in memory at a time
        kernel = indexes[target].modules[path].kernel
        shape = tuple(kernel.shape)
        delta = sum(np.float32(weight * layer.scale) * _delta(layer, shape) for weight, layer in adapters)
        old = kernel.get_value()
        sharding = getattr(old, "sharding", None)
        new = _add(old, jax.device_put(delta, sharding) if sharding is not None else delta)
        kernel.set_value(jax.device_put(new, sharding) if sharding is not None else new)
        counts[target] += 1
    return counts



"""IP-Adapters at run time: the loaded adapter (`IPAdapter`), the checks that it fits a UNet and an image
encoder (one-sentence `UserError`s), attaching its `to_k_ip`/`to_v_ip` to a UNet, and merging a FaceID LoRA.

Reading and writing adapter files (official `.bin`/`.safetensors` and this project's Flax folder) is
`weights/ip_adapter_files.py`; what an adapter is, `models/adapter_spec.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.errors import UserError
from ipadapter_jax.models.adapter_spec import IMAGE_EMBEDS, PENULTIMATE, AdapterSpec
from ipadapter_jax.models.image_proj import project_tokens
from ipadapter_jax.models.unet import cross_attentions
from ipadapter_jax.models.unet_config import UNetConfig, base_name


@dataclasses.dataclass
class IPAdapter:
    """One loaded adapter. to_k_ip/to_v_ip: per layer (spec.layer_paths order), Flax layout [cross, hidden].
    lora: "<attn path>.<to_q|to_k|to_v|to_out>" -> (down [in, rank], up [rank, out]), FaceID only."""

    spec: AdapterSpec
    image_proj: nnx.Module
    to_k_ip: tuple[jax.Array, ...]
    to_v_ip: tuple[jax.Array, ...]
    lora: dict[str, tuple[jax.Array, jax.Array]] = dataclasses.field(default_factory=dict)

    def tokens(self, features=None, face_embeds=None, *, shortcut: bool = False, shortcut_scale=1.0) -> jax.Array:
        """Image tokens (..., T, C) for features with any leading dims (see `project_tokens`)."""
        return project_tokens(self.image_proj, self.spec, features, face_embeds, shortcut=shortcut,
                              shortcut_scale=shortcut_scale)

    def tensors(self, dtype=None) -> dict[str, np.ndarray]:
        """Every tensor under its Flax name (our file format), as host arrays, optionally cast."""
        def host(x):
            a = np.asarray(jax.device_get(x))
            return a.astype(dtype) if dtype is not None else a

        out = {"image_proj." + ".".join(map(str, p)): host(v.get_value())
               for p, v in nnx.to_flat_state(nnx.state(self.image_proj))}
        for path, k, v in zip(self.spec.layer_paths, self.to_k_ip, self.to_v_ip, strict=True):
            out[f"{path}.to_k_ip.kernel"] = host(k)
            out[f"{path}.to_v_ip.kernel"] = host(v)
        for key, (down, up) in self.lora.items():
            out[f"{key}_lora.down.kernel"] = host(down)
            out[f"{key}_lora.up.kernel"] = host(up)
        return out


# ------------------------------------------------------------------------------------------------ checks


def _label(spec: AdapterSpec) -> str:
    return spec.name or f"this {spec.variant} IP-Adapter"


def _describe(cross: int, n: int) -> str:
    return base_name(cross, n) or "custom-size"


def _a(word: str) -> str:
    return "an" if word[0] in "AEIOSaeio" else "a"


def check_fits(label: str, cross: int, num_layers: int, config: UNetConfig) -> None:
    """An adapter of this cross-attention width and layer count can drive a UNet of `config`."""
    layers = config.cross_attention_layers()
    if (cross, num_layers) != (config.context_dim, len(layers)):
        mine, theirs = _describe(cross, num_layers), _describe(config.context_dim, len(layers))
        fix = (f"load {_a(theirs)} {theirs} adapter or {_a(mine)} {mine} base" if mine != theirs
               else "load an adapter made for this UNet")
        raise UserError(f"{label} is {_a(mine)} {mine} adapter (cross-attention {cross}, {num_layers} layers) and "
                        f"cannot drive this {theirs} UNet ({config.context_dim}, {len(layers)} layers): {fix}.")


def check_unet(spec: AdapterSpec, unet_or_config) -> None:
    """The adapter fits the UNet: same cross-attention width, layer paths and layer widths."""
    config = unet_or_config if isinstance(unet_or_config, UNetConfig) else unet_or_config.config
    check_fits(_label(spec), spec.cross_attention_dim, spec.num_layers, config)
    for layer, p, h in zip(config.cross_attention_layers(), spec.layer_paths, spec.layer_hidden_sizes, strict=True):
        if (layer.path, layer.hidden_size) != (p, h):
            raise UserError(f"{_label(spec)} was made for a UNet whose cross-attention layer {p} is {h} wide, "
                            f"but this UNet has {layer.path} of width {layer.hidden_size}: load an adapter made "
                            "for this UNet.")


_ENCODERS = {IMAGE_EMBEDS: {1024: "ViT-H", 1280: "ViT-bigG", 768: "ViT-L"},
             PENULTIMATE: {1280: "ViT-H", 1664: "ViT-bigG", 1024: "ViT-L"}}
_FOLDERS = {"ViT-H": "h94/IP-Adapter models/image_encoder", "ViT-bigG": "h94/IP-Adapter sdxl_models/image_encoder"}


def check_image_encoder(spec: AdapterSpec, encoder) -> None:
    """The encoder gives the features the projection reads (`projection_dim` or `hidden_size`); FaceID needs none."""
    if not spec.needs_image_encoder:
        return
    feature = spec.image_feature
    want = spec.image_feature_dim
    want_name = _ENCODERS[feature].get(want)
    kind = f"{want_name} image encoder" if want_name else "image encoder"
    if encoder is None:
        raise UserError(f"{_label(spec)} needs {_a(kind)} {kind} ({want}-d {feature}); pass one "
                        f"({_FOLDERS.get(want_name, 'the one it was trained with')}).")
    got = encoder.projection_dim if feature == IMAGE_EMBEDS else encoder.hidden_size
    if got != want:
        got_name = _ENCODERS[feature].get(got, "another model")
        use = _FOLDERS.get(want_name, f"an encoder with {want}-d {feature}")
        raise UserError(f"{_label(spec)} expects {_a(kind)} {kind} ({want}-d {feature}) but the encoder gives "
                        f"{got}-d ({got_name}): use {use}.")


# ------------------------------------------------------------------------------------------- into a UNet


def attach(unet, adapters: Sequence[IPAdapter]) -> None:
    """Set the UNet's `to_k_ip[a]`/`to_v_ip[a]` to adapter a's weights (kept in the UNet's dtype and placement)."""
    layers = cross_attentions(unet)
    slots = len(layers[0].to_k_ip) if layers else 0
    if slots != len(adapters):
        raise UserError(f"the UNet was built with {slots} IP-Adapter slots but {len(adapters)} adapters were "
                        f"given: load the UNet with num_ip_adapters={len(adapters)}.")
    for a, adapter in enumerate(adapters):
        check_unet(adapter.spec, unet)
        for layer, k, v in zip(layers, adapter.to_k_ip, adapter.to_v_ip, strict=True):
            _assign(layer.to_k_ip[a].kernel, k)
            _assign(layer.to_v_ip[a].kernel, v)


def _assign(var: nnx.Variable, value: jax.Array) -> None:
    old = var.get_value()
    new = jnp.asarray(value, old.dtype)
    sharding = getattr(old, "sharding", None)
    var.set_value(jax.device_put(new, sharding) if sharding is not None else new)


def _submodule(root: nnx.Module, path: str):
    node = root
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def merge_faceid_lora(unet, adapter: IPAdapter, scale: float = 1.0) -> int:
    """Merge a FaceID adapter's LoRA into the UNet's to_q/to_k/to_v/to_out.0 kernels:
    W += scale * up @ down, exactly the official `to_x(h) + lora_scale * to_x_lora(h)`. Returns the count of
    merged projections; merging again with -scale undoes it (to rounding)."""
    if adapter.lora:
        check_unet(adapter.spec, unet)
    for key, (down, up) in adapter.lora.items():
        attn_path, target = key.rsplit(".", 1)
        attn = _submodule(unet, attn_path)
        linear = attn.to_out[0] if target == "to_out" else getattr(attn, target)
        kernel = linear.kernel.get_value()
        delta = jnp.dot(down.astype(jnp.float32), up.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        _assign(linear.kernel, (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype))
    return len(adapter.lora)

"""The official IP-Adapter checkpoint layout: reading and writing it, detecting the variant, and the key tables
between it and this project's Flax names.

Official files (tencent-ailab/IP-Adapter, h94/IP-Adapter*):
- `.bin`: `{"image_proj": {...}, "ip_adapter": {"1.to_k_ip.weight", "1.to_v_ip.weight", "3.to_k_ip.weight", ...}}`;
- `.safetensors`: the same, flattened with the prefixes `image_proj.` and `ip_adapter.`.
`ip_adapter.<k>` indexes every attention processor of the UNet (attn1 and attn2 of each transformer block, in
down, up, mid order): attn2 number i (`UNetConfig.cross_attention_layers()[i]`) is k = 2i + 1 and its attn1 is
k = 2i. FaceID files also carry a rank-128 LoRA `<k>.to_{q,k,v,out}_lora.{down,up}.weight` on every processor.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
from flax import nnx

from ipadapter_jax.errors import CheckpointError, ConfigError
from ipadapter_jax.models.adapter_spec import AdapterSpec, ResamplerSpec
from ipadapter_jax.models.image_proj import build_image_proj
from ipadapter_jax.models.layers import abstract_model
from ipadapter_jax.models.unet_config import BASE_NAMES, STANDARD_BASES, UNetConfig, base_name, standard_base
from ipadapter_jax.weights.checkpoint_files import flatten, load_torch_file
from ipadapter_jax.weights.safetensors_io import SafetensorsFile, save_safetensors
from ipadapter_jax.weights.torch_layout import flat_variables, to_flax_layout, to_torch_layout, torch_key

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out")  # official `<name>_lora`; to_out is the UNet's `to_out.0`

def official_index(layer: int) -> int:
    """`ip_adapter.<k>` of attn2 number `layer`; its attn1 processor is k - 1."""
    return 2 * layer + 1


def resolve_unet_config(unet_config, *, num_layers: int, cross_attention_dim: int, source: str) -> UNetConfig:
    """A UNetConfig from itself, a base name (sd15/sd2/sdxl), a UNet or pipeline folder, a config.json, or None
    (the standard base with this many layers of this width)."""
    if isinstance(unet_config, UNetConfig):
        return unet_config
    if unet_config is None:
        for key, config in STANDARD_BASES.items():
            if BASE_NAMES[key] == base_name(cross_attention_dim, num_layers):
                return config
        raise ConfigError(
            f"cannot tell which UNet {source} was made for ({num_layers} cross-attention layers of width "
            f"{cross_attention_dim}, not a standard SD1.5/SD2.x/SDXL base); pass --base sd15|sd2|sdxl or the "
            "UNet folder.")
    name = str(unet_config)
    standard = standard_base(name)
    if standard is not None:
        return standard
    path = Path(name)
    for candidate in (path, path / "config.json", path / "unet" / "config.json"):
        if candidate.is_file():
            return UNetConfig.from_json(candidate)
    raise ConfigError(f"base {name!r} is neither sd15, sd2, sdxl nor a UNet folder with config.json; "
                      "pass one of those.")


# ---------------------------------------------------------------------------------------------- reading files


@dataclass
class OfficialFile:
    """The two halves of an official checkpoint, keys without their `image_proj.`/`ip_adapter.` prefix."""

    image_proj: dict[str, np.ndarray]
    ip_adapter: dict[str, np.ndarray]
    path: Path


def read_official(path: str | os.PathLike) -> OfficialFile:
    """An official `.bin` (nested) or `.safetensors` (flattened) IP-Adapter file; dtypes kept as stored."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"IP-Adapter file {path} does not exist.")
    if path.suffix == ".safetensors":
        f = SafetensorsFile(path)
        flat = {k: f[k] for k in f}
    else:
        tree = load_torch_file(path)
        if not isinstance(tree, dict):
            raise CheckpointError(f"{path} holds a {type(tree).__name__}, not an IP-Adapter state dict.")
        flat = flatten(tree)
    # An accelerate training checkpoint (`image_proj_model.*`, `adapter_modules.*`, `unet.*`) converts as the
    # official README does it: keep the first two, drop the frozen UNet.
    training = any(k.startswith("adapter_modules.") for k in flat)
    parts: dict[str, dict[str, np.ndarray]] = {"image_proj": {}, "ip_adapter": {}}
    other = []
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        head = {"image_proj_model": "image_proj", "adapter_modules": "ip_adapter"}.get(head, head)
        if head in parts and rest:
            parts[head][rest] = value
        elif not (training and head == "unet"):
            other.append(key)
    if other:
        raise CheckpointError(f"{path} is not an IP-Adapter checkpoint: it has keys outside image_proj/ip_adapter "
                              f"({_summary(other, 5)}); pass an ip-adapter*.bin or .safetensors file.")
    for name, part in parts.items():
        if not part:
            raise CheckpointError(f"{path} has no {name} part; it is not a complete IP-Adapter checkpoint.")
    return OfficialFile(parts["image_proj"], parts["ip_adapter"], path)


def write_official(image_proj: Mapping[str, np.ndarray], ip_adapter: Mapping[str, np.ndarray],
                   path: str | os.PathLike) -> None:
    """Write the official layout atomically: `.safetensors` flattened, anything else a nested torch pickle."""
    path = Path(path)
    if path.suffix == ".safetensors":
        flat = {f"image_proj.{k}": v for k, v in image_proj.items()}
        flat.update({f"ip_adapter.{k}": v for k, v in ip_adapter.items()})
        save_safetensors(flat, path)
        return
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"writing {path.name} (a PyTorch pickle) needs torch: install it, or export to "
                              ".safetensors instead.") from None
    nested = {"image_proj": {k: _to_torch(v) for k, v in image_proj.items()},
              "ip_adapter": {k: _to_torch(v) for k, v in ip_adapter.items()}}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.save(nested, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _to_torch(array: np.ndarray):
    import torch

    a = np.ascontiguousarray(array)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


# --------------------------------------------------------------------------------------- variant detection

_IP_KEY = re.compile(r"(\d+)\.to_([kv])_ip\.weight")
_LORA_KEY = re.compile(r"(\d+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")


def _require(shapes: Mapping[str, tuple], keys: list[str], what: str, source: str) -> None:
    missing = [k for k in keys if k not in shapes]
    if missing:
        raise CheckpointError(f"{source} looks like a {what} IP-Adapter but lacks image_proj keys "
                              f"{', '.join(missing)}; the file is incomplete or of an unknown variant.")


def _resampler(shapes: Mapping[str, tuple], prefix: str, num_queries: int, source: str) -> ResamplerSpec:
    depth = 1 + max((int(m.group(1)) for k in shapes if (m := re.match(rf"{re.escape(prefix)}layers\.(\d+)\.", k))),
                    default=-1)
    _require(shapes, [f"{prefix}proj_in.weight", f"{prefix}proj_out.weight", f"{prefix}layers.0.0.to_q.weight",
                      f"{prefix}layers.0.1.1.weight"], "Plus", source)
    dim, embedding_dim = shapes[f"{prefix}proj_in.weight"]
    inner = shapes[f"{prefix}layers.0.0.to_q.weight"][0]
    return ResamplerSpec(dim=dim, depth=depth, heads=inner // 64, dim_head=64, num_queries=num_queries,
                         embedding_dim=embedding_dim, output_dim=shapes[f"{prefix}proj_out.weight"][0],
                         ff_mult=shapes[f"{prefix}layers.0.1.1.weight"][0] // dim)


def detect(image_proj_shapes: Mapping[str, tuple], ip_adapter_shapes: Mapping[str, tuple],
           source: str = "the file") -> dict:
    """The projection fields of an AdapterSpec (everything but the UNet layers) from the file's keys and shapes.

    Same order of tests as diffusers' converter: `proj.weight` base; `proj.3.weight` full;
    `perceiver_resampler.*` FaceID-Plus; `norm.weight` FaceID (Portrait when it carries no LoRA); else Plus.
    """
    s = image_proj_shapes
    downs = [shape for k, shape in ip_adapter_shapes.items() if (m := _LORA_KEY.fullmatch(k)) and m.group(3) == "down"]
    rank = int(downs[0][0]) if downs else 0
    if "proj.weight" in s:
        _require(s, ["norm.weight"], "base", source)
        cross = s["norm.weight"][0]
        return dict(variant="base", num_tokens=s["proj.weight"][0] // cross, cross_attention_dim=cross,
                    image_feature_dim=s["proj.weight"][1])
    if "proj.3.weight" in s:
        _require(s, ["proj.0.weight"], "full", source)
        return dict(variant="full", num_tokens=257, cross_attention_dim=s["proj.3.weight"][0],
                    image_feature_dim=s["proj.0.weight"][1])
    if "perceiver_resampler.proj_in.weight" in s or "norm.weight" in s:
        _require(s, ["norm.weight", "proj.0.weight", "proj.2.weight"], "FaceID", source)
        cross = s["norm.weight"][0]
        tokens = s["proj.2.weight"][0] // cross
        face = dict(num_tokens=tokens, cross_attention_dim=cross, face_embed_dim=s["proj.0.weight"][1],
                    face_hidden_dim=s["proj.0.weight"][0], lora_rank=rank)
        if "perceiver_resampler.proj_in.weight" in s:
            r = _resampler(s, "perceiver_resampler.", tokens, source)
            return dict(variant="faceid-plus", image_feature_dim=r.embedding_dim, resampler=r, **face)
        return dict(variant="faceid" if rank else "faceid-portrait", image_feature_dim=0, **face)
    if "latents" in s:
        r = _resampler(s, "", s["latents"][1], source)
        return dict(variant="plus", num_tokens=r.num_queries, cross_attention_dim=r.output_dim,
                    image_feature_dim=r.embedding_dim, resampler=r)
    raise CheckpointError(f"{source} has image_proj keys of no known IP-Adapter variant "
                          f"({', '.join(sorted(s)[:6])}); supported: base, plus, full(-face), FaceID, FaceID-Plus.")


def file_layers(ip_adapter_shapes: Mapping[str, tuple], source: str = "the file") -> tuple[int, int, tuple[int, ...]]:
    """(layer count, cross-attention width, per-layer hidden sizes) read from the `<k>.to_k_ip.weight` keys."""
    found = {int(m.group(1)): shape for k, shape in ip_adapter_shapes.items()
             if (m := _IP_KEY.fullmatch(k)) and m.group(2) == "k"}
    if not found:
        raise CheckpointError(f"{source} has no ip_adapter.<k>.to_k_ip.weight keys; it is not an IP-Adapter "
                              "checkpoint for a UNet.")
    n = (max(found) + 1) // 2
    crosses = [shape[1] for shape in found.values()]
    cross = max(set(crosses), key=crosses.count)
    return n, cross, tuple(int(found.get(official_index(i), (0,))[0]) for i in range(n))


# ------------------------------------------------------------------------------------- official <-> Flax keys


@dataclass(frozen=True)
class Entry:
    """One tensor: its official key (with `image_proj.`/`ip_adapter.` prefix), Flax name, leaf, torch shape."""

    official: str
    flax: str
    leaf: str
    torch_shape: tuple[int, ...]

    @property
    def flax_shape(self) -> tuple[int, ...]:
        return self.torch_shape[::-1] if self.leaf == "kernel" and len(self.torch_shape) == 2 else self.torch_shape


def key_table(spec: AdapterSpec) -> list[Entry]:
    """Every tensor of an adapter: projection keys from the Flax module paths (the plain rename table), then
    `to_k_ip`/`to_v_ip` per layer, then the FaceID LoRA of each attn1/attn2 processor."""
    abstract = abstract_model(lambda: build_image_proj(spec, rngs=nnx.Rngs(0)))
    table = []
    for path, var in flat_variables(abstract).items():
        leaf = str(path[-1])
        shape = tuple(var.shape)
        torch_shape = shape[::-1] if leaf == "kernel" and len(shape) == 2 else shape
        table.append(Entry(f"image_proj.{torch_key(path)}", "image_proj." + ".".join(map(str, path)), leaf,
                           torch_shape))
    cross = spec.cross_attention_dim
    for i, (path, hidden) in enumerate(zip(spec.layer_paths, spec.layer_hidden_sizes, strict=True)):
        for kv in ("k", "v"):
            table.append(Entry(f"ip_adapter.{official_index(i)}.to_{kv}_ip.weight", f"{path}.to_{kv}_ip.kernel",
                               "kernel", (hidden, cross)))
    if spec.lora_rank:
        r = spec.lora_rank
        for i, (path, hidden) in enumerate(zip(spec.layer_paths, spec.layer_hidden_sizes, strict=True)):
            self_path = path.rsplit(".", 1)[0] + ".attn1"
            for k, proc, kv_in in ((official_index(i) - 1, self_path, hidden), (official_index(i), path, cross)):
                for target in LORA_TARGETS:
                    fan_in = kv_in if target in ("to_k", "to_v") else hidden
                    for part, shape in (("down", (r, fan_in)), ("up", (hidden, r))):
                        table.append(Entry(f"ip_adapter.{k}.{target}_lora.{part}.weight",
                                           f"{proc}.{target}_lora.{part}.kernel", "kernel", shape))
    return table


def _summary(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _check(present: Mapping[str, tuple], wanted: dict[str, tuple], what: str, source: str) -> None:
    missing = wanted.keys() - present.keys()
    unexpected = present.keys() - wanted.keys()
    if missing or unexpected:
        parts = ([f"missing keys: {_summary(missing)}"] if missing else []) + (
            [f"unexpected keys: {_summary(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{source} does not match {what} ({'; '.join(parts)}); the file is incomplete, "
                              "damaged, or belongs to another variant or UNet.")
    wrong = [f"{k} {tuple(present[k])} vs {wanted[k]}" for k in wanted if tuple(present[k]) != wanted[k]]
    if wrong:
        raise CheckpointError(f"{source} has tensors of the wrong shape for {what} (file vs expected: "
                              f"{_summary(wrong, 4)}); it belongs to another variant or UNet.")


def official_to_flax(f: OfficialFile, spec: AdapterSpec) -> dict[str, np.ndarray]:
    """Flax-named, Flax-layout tensors (dtypes untouched) of an official file; every key used exactly once."""
    flat = {f"image_proj.{k}": v for k, v in f.image_proj.items()}
    flat.update({f"ip_adapter.{k}": v for k, v in f.ip_adapter.items()})
    table = key_table(spec)
    _check({k: v.shape for k, v in flat.items()}, {e.official: e.torch_shape for e in table},
           f"a {spec.variant} IP-Adapter for this UNet", str(f.path))
    return {e.flax: to_flax_layout(e.leaf, flat[e.official]) for e in table}


def flax_to_official(tensors: Mapping[str, np.ndarray], spec: AdapterSpec, source: str = "the adapter"
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(image_proj, ip_adapter) official state dicts (unprefixed keys, torch layouts, dtypes untouched)."""
    table = key_table(spec)
    _check({k: tuple(v.shape) for k, v in tensors.items()}, {e.flax: e.flax_shape for e in table},
           f"its {spec.variant} IP-Adapter spec", source)
    image_proj, ip_adapter = {}, {}
    for e in table:
        into, key = (image_proj, e.official[len("image_proj."):]) if e.official.startswith("image_proj.") else (
            ip_adapter, e.official[len("ip_adapter."):])
        into[key] = to_torch_layout(e.leaf, np.asarray(tensors[e.flax]))
    return image_proj, ip_adapter

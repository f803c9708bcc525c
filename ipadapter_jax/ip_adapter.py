"""IP-Adapters at run time: load (official `.bin`/`.safetensors` or this project's Flax folder), check against a
UNet and an image encoder, attach to a UNet, compute image features and tokens, save, and convert.

API (signatures are stable; the training code builds on them):

    AdapterSpec, ResamplerSpec                       what an adapter is (models/image_proj.py); to_json/from_json
    make_spec(variant, unet_config, *, image_feature_dim=0, num_tokens=None, resampler=None,
              face_embed_dim=512, lora_rank=None, name="") -> AdapterSpec          official defaults, for training
    build_image_proj(spec, *, dtype, rngs) -> nnx.Module                          the projection (IPAdapterParam)
    IPAdapter(spec, image_proj, to_k_ip, to_v_ip, lora)     .tokens(...), .tensors(), .from_unet(...)
    load_ip_adapter(path, *, unet_config=None, dtype="float32") -> IPAdapter
    attach(unet, adapters)                           sets unet's to_k_ip[a]/to_v_ip[a] (num_ip_adapters=len(adapters))
    merge_faceid_lora(unet, adapter, scale=1.0)      FaceID: W += scale * up @ down on to_q/to_k/to_v/to_out.0
    check_unet(spec, unet_or_config), check_image_encoder(spec, encoder)    one-sentence UserErrors
    image_processor_for(encoder_folder, image_size=224), pixel_values(processor, images)
    image_features(encoder, pixel_values, spec), uncond_image_features(encoder, pixel_values, spec)
    save_ip_adapter(adapter, out_dir, *, dtype=None, overwrite=False)             our Flax folder
    export_ip_adapter(adapter, out_file, *, dtype=None, overwrite=False)          official layout (.safetensors/.bin)
    convert_to_flax(src_file, out_dir, *, unet_config=None, overwrite=False) -> AdapterSpec
    convert_to_torch(flax_dir, out_file, *, overwrite=False) -> Path              bit-exact round trip

Our Flax folder: `ip_adapter.json` ({"format", "format_version", "spec", "dtype", "source"}) and
`ip_adapter.safetensors` with Flax names and layouts: `image_proj.<module path>` (e.g. `image_proj.proj.kernel`),
`<attn2 path>.to_k_ip.kernel` / `.to_v_ip.kernel` ([cross, hidden]) and, for FaceID,
`<attn path>.<to_q|to_k|to_v|to_out>_lora.<down|up>.kernel`. Tensors keep the dtype they were saved in.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.errors import CheckpointError, ConfigError, UserError
from ipadapter_jax.models.image_proj import (
    FEATURE_OF,
    IMAGE_EMBEDS,
    NO_IMAGE,
    PENULTIMATE,
    VARIANTS,
    AdapterSpec,
    ResamplerSpec,
    build_image_proj,
    project_tokens,
)
from ipadapter_jax.models.layers import abstract_model
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.weights import ip_adapter_layout as layout
from ipadapter_jax.weights.safetensors_io import SafetensorsFile, save_safetensors
from ipadapter_jax.weights.torch_layout import flat_variables

__all__ = ["AdapterSpec", "ResamplerSpec", "VARIANTS", "IPAdapter", "make_spec", "build_image_proj",
           "load_ip_adapter", "attach", "merge_faceid_lora", "check_unet", "check_image_encoder",
           "image_processor_for", "pixel_values", "image_features", "uncond_image_features", "save_ip_adapter",
           "export_ip_adapter", "convert_to_flax", "convert_to_torch"]

FORMAT = "ipadapter_jax.ip_adapter"
FORMAT_VERSION = 1
SPEC_FILE = "ip_adapter.json"
WEIGHTS_FILE = "ip_adapter.safetensors"


def make_spec(variant: str, unet_config, *, image_feature_dim: int = 0, num_tokens: int | None = None,
              resampler: ResamplerSpec | None = None, face_embed_dim: int = 512, lora_rank: int | None = None,
              name: str = "") -> AdapterSpec:
    """A new adapter's spec with the official recipe's defaults (tutorial_train*.py) for this UNet.

    image_feature_dim: the encoder's `projection_dim` (base) or `hidden_size` (plus, full, faceid-plus).
    Plus: 16 queries; Resampler dim = cross width, 12 heads (SDXL: dim 1280, 20 heads). FaceID: 4 tokens,
    LoRA rank 128; Portrait: 16 tokens, no LoRA.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"IP-Adapter variant {variant!r} is unknown; use one of {', '.join(VARIANTS)}.")
    config = layout.resolve_unet_config(unet_config, num_layers=0, cross_attention_dim=0, source="the adapter")
    layers = layout.ip_layers(config)
    cross = config.context_dim
    default_tokens = {"base": 4, "plus": 16, "full": 257, "faceid": 4, "faceid-portrait": 16, "faceid-plus": 4}
    tokens = num_tokens or default_tokens[variant]
    face = dict(face_embed_dim=face_embed_dim, face_hidden_dim=2 * face_embed_dim) if variant.startswith(
        "faceid") else {}
    if variant in ("plus", "faceid-plus") and resampler is None:
        if image_feature_dim <= 0:
            raise ConfigError(f"a {variant} IP-Adapter needs image_feature_dim (the encoder's hidden size).")
        dim, heads = (1280, 20) if variant == "plus" and cross == 2048 else (
            cross, 12 if variant == "plus" else max(cross // 64, 1))
        resampler = ResamplerSpec(dim=dim, depth=4, heads=heads, num_queries=tokens,
                                  embedding_dim=image_feature_dim, output_dim=cross)
    feature = FEATURE_OF[variant]
    if feature != NO_IMAGE and image_feature_dim <= 0:
        raise ConfigError(f"a {variant} IP-Adapter needs image_feature_dim (the image encoder's width).")
    rank = lora_rank if lora_rank is not None else (128 if variant == "faceid" else 0)
    return AdapterSpec(variant=variant, num_tokens=tokens, cross_attention_dim=cross, image_feature=feature,
                       image_feature_dim=image_feature_dim if feature != NO_IMAGE else 0,
                       layer_paths=tuple(p for p, _ in layers), layer_hidden_sizes=tuple(h for _, h in layers),
                       resampler=resampler if variant in ("plus", "faceid-plus") else None, lora_rank=rank,
                       name=name, **face)


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
               for p, v in flat_variables(self.image_proj).items()}
        for path, k, v in zip(self.spec.layer_paths, self.to_k_ip, self.to_v_ip, strict=True):
            out[f"{path}.to_k_ip.kernel"] = host(k)
            out[f"{path}.to_v_ip.kernel"] = host(v)
        for key, (down, up) in self.lora.items():
            out[f"{key}_lora.down.kernel"] = host(down)
            out[f"{key}_lora.up.kernel"] = host(up)
        return out

    @classmethod
    def from_unet(cls, spec: AdapterSpec, image_proj: nnx.Module, unet, index: int = 0,
                  lora: dict | None = None) -> IPAdapter:
        """Collect adapter `index`'s to_k_ip/to_v_ip from a (trained) UNet."""
        from ipadapter_jax.models.unet import cross_attentions

        check_unet(spec, unet)
        layers = cross_attentions(unet)
        return cls(spec, image_proj, tuple(m.to_k_ip[index].kernel[...] for m in layers),
                   tuple(m.to_v_ip[index].kernel[...] for m in layers), dict(lora or {}))


# ------------------------------------------------------------------------------------------------ checks


def _label(spec: AdapterSpec) -> str:
    return spec.name or f"this {spec.variant} IP-Adapter"


def _describe(cross: int, n: int) -> str:
    return layout.base_name(cross, n) or "custom-size"


def _a(word: str) -> str:
    return "an" if word[0] in "AEIOSaeio" else "a"


def _fit(label: str, cross: int, n: int, config: UNetConfig) -> None:
    layers = layout.ip_layers(config)
    if (cross, n) != (config.context_dim, len(layers)):
        mine, theirs = _describe(cross, n), _describe(config.context_dim, len(layers))
        fix = (f"load {_a(theirs)} {theirs} adapter or {_a(mine)} {mine} base" if mine != theirs
               else "load an adapter made for this UNet")
        raise UserError(f"{label} is {_a(mine)} {mine} adapter (cross-attention {cross}, {n} layers) and cannot "
                        f"drive this {theirs} UNet ({config.context_dim}, {len(layers)} layers): {fix}.")


def check_unet(spec: AdapterSpec, unet_or_config) -> None:
    """The adapter fits the UNet: same cross-attention width, layer paths and layer widths."""
    config = unet_or_config if isinstance(unet_or_config, UNetConfig) else unet_or_config.config
    _fit(_label(spec), spec.cross_attention_dim, spec.num_layers, config)
    for (path, width), p, h in zip(layout.ip_layers(config), spec.layer_paths, spec.layer_hidden_sizes, strict=True):
        if (path, width) != (p, h):
            raise UserError(f"{_label(spec)} was made for a UNet whose cross-attention layer {p} is {h} wide, "
                            f"but this UNet has {path} of width {width}: load an adapter made for this UNet.")


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


# ------------------------------------------------------------------------------------------------ loading


def spec_from_official(f: layout.OfficialFile, unet_config=None) -> AdapterSpec:
    """Detect the variant from the file's keys and shapes and pair it with the UNet it was made for."""
    source = str(f.path)
    proj_shapes = {k: tuple(v.shape) for k, v in f.image_proj.items()}
    ip_shapes = {k: tuple(v.shape) for k, v in f.ip_adapter.items()}
    fields = layout.detect(proj_shapes, ip_shapes, source)
    n, cross, hidden = layout.file_layers(ip_shapes, source)
    if cross != fields["cross_attention_dim"]:
        raise CheckpointError(f"{source} is inconsistent: its image projection outputs {fields['cross_attention_dim']}"
                              f"-d tokens but its to_k_ip layers read {cross}-d ones; the file is damaged.")
    config = layout.resolve_unet_config(unet_config, num_layers=n, cross_attention_dim=cross, source=source)
    _fit(f.path.name, cross, n, config)
    layers = layout.ip_layers(config)
    for (path, width), h in zip(layers, hidden, strict=True):
        if h and h != width:
            raise UserError(f"{f.path.name} has {h}-wide IP layers where this UNet's {path} is {width} wide: "
                            "load an adapter made for this UNet.")
    return AdapterSpec(image_feature=FEATURE_OF[fields["variant"]], layer_paths=tuple(p for p, _ in layers),
                       layer_hidden_sizes=tuple(h for _, h in layers), name=f.path.name, **fields)


def read_flax_folder(folder: str | os.PathLike) -> tuple[AdapterSpec, Mapping[str, np.ndarray], dict]:
    """(spec, tensors by Flax name, the JSON record) of one of our adapter folders."""
    folder = Path(folder)
    meta_path = folder / SPEC_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{folder} is not an ipadapter-jax adapter folder (no {SPEC_FILE}); pass such a "
                              "folder or an official ip-adapter*.bin/.safetensors file.")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{meta_path} is not valid JSON ({e}); re-convert the adapter.") from None
    if meta.get("format") != FORMAT or not isinstance(meta.get("spec"), dict):
        raise CheckpointError(f"{meta_path} is not an ipadapter-jax adapter record; re-convert the adapter.")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{folder} uses adapter format version {meta['format_version']}, newer than this "
                              f"ipadapter-jax reads ({FORMAT_VERSION}); upgrade ipadapter-jax.")
    try:
        spec = AdapterSpec.from_dict(meta["spec"])
    except ConfigError as e:
        raise CheckpointError(f"{meta_path}: {e}") from None
    return spec, SafetensorsFile(folder / WEIGHTS_FILE), meta


def _from_tensors(spec: AdapterSpec, tensors: Mapping[str, np.ndarray], dtype, source: str) -> IPAdapter:
    from ipadapter_jax.weights.pretrained import as_dtype

    layout.flax_to_official(tensors, spec, source)  # checks every key and shape
    dt = as_dtype(dtype)
    graphdef, state = nnx.split(abstract_model(lambda: build_image_proj(spec, dtype=dt, rngs=nnx.Rngs(0))))
    for path, var in flat_variables(state).items():
        var.set_value(jnp.asarray(np.asarray(tensors["image_proj." + ".".join(map(str, path))]), dt))
    image_proj = nnx.merge(graphdef, state)
    get = lambda name: jnp.asarray(np.asarray(tensors[name]), dt)  # noqa: E731
    lora = {}
    if spec.lora_rank:
        for name in tensors:
            if name.endswith("_lora.down.kernel"):
                key = name[: -len("_lora.down.kernel")]
                lora[key] = (get(name), get(f"{key}_lora.up.kernel"))
    return IPAdapter(spec, image_proj, tuple(get(f"{p}.to_k_ip.kernel") for p in spec.layer_paths),
                     tuple(get(f"{p}.to_v_ip.kernel") for p in spec.layer_paths), lora)


def load_ip_adapter(path: str | os.PathLike, *, unet_config=None, dtype="float32") -> IPAdapter:
    """An official `.bin`/`.safetensors` file or one of our folders. `unet_config` (UNetConfig, sd15/sd2/sdxl,
    or a UNet folder) is the UNet the adapter must fit; for official files it is inferred when standard."""
    path = Path(path)
    if path.is_dir():
        spec, tensors, _ = read_flax_folder(path)
        if unet_config is not None:
            check_unet(spec, layout.resolve_unet_config(unet_config, num_layers=spec.num_layers,
                                                        cross_attention_dim=spec.cross_attention_dim,
                                                        source=str(path)))
        return _from_tensors(spec, tensors, dtype, str(path))
    f = layout.read_official(path)
    spec = spec_from_official(f, unet_config)
    return _from_tensors(spec, layout.official_to_flax(f, spec), dtype, str(path))


def attach(unet, adapters: Sequence[IPAdapter]) -> None:
    """Set the UNet's `to_k_ip[a]`/`to_v_ip[a]` to adapter a's weights (kept in the UNet's dtype and placement)."""
    from ipadapter_jax.models.unet import cross_attentions

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


# ------------------------------------------------------------------------------------------ image features


def image_processor_for(encoder_folder: str | os.PathLike | None, image_size: int = 224):
    """CLIP preprocessing as the official code does it: the encoder folder's `preprocessor_config.json` if
    present, else transformers' CLIP defaults at `image_size` (shortest side, bicubic, centre crop, CLIP mean/std)."""
    from ipadapter_jax.data.transforms import clip_image_processor

    return clip_image_processor(None if encoder_folder is None else str(encoder_folder), image_size)


def pixel_values(processor, images) -> np.ndarray:
    """(N, 3, S, S) float32 encoder input for PIL images (or HWC uint8 arrays)."""
    return np.asarray(processor(images=images, return_tensors="np")["pixel_values"], np.float32)


def image_features(encoder, pixel_values_NCHW: jax.Array, spec: AdapterSpec) -> jax.Array:
    """What the projection reads: `image_embeds` (N, P) or `hidden_states[-2]` (N, L, C)."""
    check_image_encoder(spec, encoder)
    out = encoder(pixel_values_NCHW)
    return out.image_embeds if spec.image_feature == IMAGE_EMBEDS else out.hidden_states[-2]


def uncond_image_features(encoder, pixel_values_NCHW: jax.Array, spec: AdapterSpec) -> jax.Array:
    """The official negative branch: zeros for `image_embeds` adapters, the encoder on an all-zero (normalised)
    pixel tensor for `hidden_states[-2]` ones. FaceID's negative face embedding is zeros as well."""
    check_image_encoder(spec, encoder)
    if spec.image_feature == IMAGE_EMBEDS:
        return jnp.zeros((pixel_values_NCHW.shape[0], spec.image_feature_dim), encoder.visual_projection.kernel.dtype)
    return encoder(jnp.zeros_like(pixel_values_NCHW)).hidden_states[-2]


# -------------------------------------------------------------------------------------- saving, converting


def _dtype_summary(tensors: Mapping[str, np.ndarray]) -> str:
    names = sorted({np.dtype(t.dtype).name for t in tensors.values()})
    return names[0] if len(names) == 1 else "mixed: " + ", ".join(names)


def _write_folder(spec: AdapterSpec, tensors: Mapping[str, np.ndarray], out_dir: Path, source: str,
                  overwrite: bool) -> None:
    """Write to a temporary sibling, then rename into place: no half-written folder is ever visible."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise UserError(f"{out_dir} already exists; choose another output folder or pass overwrite.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_safetensors(tensors, tmp / WEIGHTS_FILE, metadata={"ip_adapter_variant": spec.variant})
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "spec": spec.to_dict(),
                "dtype": _dtype_summary(tensors), "source": source}
        (tmp / SPEC_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def save_ip_adapter(adapter: IPAdapter, out_dir: str | os.PathLike, *, dtype=None, overwrite: bool = False) -> Path:
    """Our Flax folder for an adapter (e.g. after training); `dtype` casts on the way out."""
    _write_folder(adapter.spec, adapter.tensors(dtype), Path(out_dir), "ipadapter-jax", overwrite)
    return Path(out_dir)


def _check_target(out_file: Path, overwrite: bool) -> None:
    if out_file.suffix not in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"):
        raise UserError(f"{out_file} must end in .safetensors or .bin (the official layouts).")
    if out_file.exists() and not overwrite:
        raise UserError(f"{out_file} already exists; choose another output file or pass overwrite.")


def export_ip_adapter(adapter: IPAdapter, out_file: str | os.PathLike, *, dtype=None,
                      overwrite: bool = False) -> Path:
    """The official layout (`.safetensors` flattened, `.bin` nested) that diffusers and the official code load."""
    out_file = Path(out_file)
    _check_target(out_file, overwrite)
    image_proj, ip = layout.flax_to_official(adapter.tensors(dtype), adapter.spec)
    layout.write_official(image_proj, ip, out_file)
    return out_file


def convert_to_flax(src_file: str | os.PathLike, out_dir: str | os.PathLike, *, unet_config=None,
                    overwrite: bool = False) -> AdapterSpec:
    """Official file -> our folder, bit-exact (dtypes as stored); the UNet is inferred when standard."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise UserError(f"{out_dir} already exists; choose another output folder or pass overwrite.")
    f = layout.read_official(src_file)
    spec = spec_from_official(f, unet_config)
    _write_folder(spec, layout.official_to_flax(f, spec), out_dir, Path(src_file).name, overwrite)
    return spec


def convert_to_torch(flax_dir: str | os.PathLike, out_file: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Our folder -> the official layout, numbered from the layer paths recorded in its spec; bit-exact."""
    out_file = Path(out_file)
    _check_target(out_file, overwrite)
    spec, tensors, _ = read_flax_folder(flax_dir)
    image_proj, ip = layout.flax_to_official(tensors, spec, str(flax_dir))
    layout.write_official(image_proj, ip, out_file)
    return out_file

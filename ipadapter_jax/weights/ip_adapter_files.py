"""IP-Adapter files: the official `.bin`/`.safetensors` (read through `ip_adapter_layout`) and this project's
Flax folder, loaded into `IPAdapter`s, saved, exported, and converted both ways bit-exactly.

Our Flax folder: `ip_adapter.json` ({"format", "format_version", "spec", "dtype", "source"}) and
`ip_adapter.safetensors` with Flax names and layouts: `image_proj.<module path>` (e.g. `image_proj.proj.kernel`),
`<attn2 path>.to_k_ip.kernel` / `.to_v_ip.kernel` ([cross, hidden]) and, for FaceID,
`<attn path>.<to_q|to_k|to_v|to_out>_lora.<down|up>.kernel`. Tensors keep the dtype they were saved in.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.errors import CheckpointError, ConfigError, UserError
from ipadapter_jax.ip_adapter import IPAdapter, check_fits, check_unet
from ipadapter_jax.models.adapter_spec import FEATURE_OF, AdapterSpec
from ipadapter_jax.models.image_proj import build_image_proj
from ipadapter_jax.models.layers import abstract_model
from ipadapter_jax.weights import ip_adapter_layout as layout
from ipadapter_jax.weights.pretrained import as_dtype
from ipadapter_jax.weights.safetensors_io import SafetensorsFile, save_safetensors
from ipadapter_jax.weights.torch_layout import flat_variables

FORMAT = "ipadapter_jax.ip_adapter"
FORMAT_VERSION = 1
SPEC_FILE = "ip_adapter.json"
WEIGHTS_FILE = "ip_adapter.safetensors"


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
    check_fits(f.path.name, cross, n, config)
    layers = config.cross_attention_layers()
    for layer, h in zip(layers, hidden, strict=True):
        if h and h != layer.hidden_size:
            raise UserError(f"{f.path.name} has {h}-wide IP layers where this UNet's {layer.path} is "
                            f"{layer.hidden_size} wide: "
                            "load an adapter made for this UNet.")
    return AdapterSpec(image_feature=FEATURE_OF[fields["variant"]], layer_paths=tuple(la.path for la in layers),
                       layer_hidden_sizes=tuple(la.hidden_size for la in layers), name=f.path.name, **fields)


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


# -------------------------------------------------------------------------------------- saving, converting


def _dtype_summary(tensors: Mapping[str, np.ndarray]) -> str:
    names = sorted({np.dtype(t.dtype).name for t in tensors.values()})
    return names[0] if len(names) == 1 else "mixed: " + ", ".join(names)


def _write_folder(spec: AdapterSpec, tensors: Mapping[str, np.ndarray], out_dir: Path, source: str,
                  overwrite: bool) -> None:
    """Write to a temporary sibling, then rename into place: no half-written folder is ever visible."""
    out_dir = Path(out_dir)
    _check_folder_target(out_dir, overwrite)
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


def _check_folder_target(out_dir: Path, overwrite: bool) -> None:
    """A new folder, or (with `overwrite`) one of our adapter folders and nothing else: never another folder."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; choose a folder path for the adapter.")
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise UserError(f"{out_dir} already exists; choose another output folder or pass --overwrite.")
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in (SPEC_FILE, WEIGHTS_FILE))
    try:
        ours = json.loads((out_dir / SPEC_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if others or not ours:
        held = ", ".join(others[:4]) + (" ..." if len(others) > 4 else "") if others else "no adapter record"
        raise UserError(f"{out_dir} is not an ipadapter-jax adapter folder ({held}); --overwrite replaces only such "
                        "folders: choose another output folder.")


def _check_target(out_file: Path, overwrite: bool) -> None:
    if out_file.suffix not in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"):
        raise UserError(f"{out_file} must end in .safetensors or .bin (the official layouts).")
    if out_file.is_dir():
        raise UserError(f"{out_file} is a folder; give a file path ending in .safetensors or .bin.")
    if out_file.exists() and not overwrite:
        raise UserError(f"{out_file} already exists; choose another output file or pass --overwrite.")


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
    _check_folder_target(out_dir, overwrite)
    f = layout.read_official(src_file)
    spec = spec_from_official(f, unet_config)
    _write_folder(spec, layout.official_to_flax(f, spec), out_dir, Path(src_file).name, overwrite)
    return spec


def convert_to_torch(flax_dir: str | os.PathLike, out_file: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Our folder -> the official layout, numbered from the layer paths recorded in its spec; bit-exact."""
    out_file = Path(out_file)
    _check_target(out_file, overwrite)
    if out_file.resolve().parent == Path(flax_dir).resolve():
        raise UserError(f"{out_file} lies inside the adapter folder {flax_dir}; write it elsewhere.")
    spec, tensors, _ = read_flax_folder(flax_dir)
    image_proj, ip = layout.flax_to_official(tensors, spec, str(flax_dir))
    layout.write_official(image_proj, ip, out_file)
    return out_file

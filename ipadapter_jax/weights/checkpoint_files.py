"""Find and open PyTorch checkpoint files: safetensors first, `.bin` through torch, sharded indexes, variants."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from ipadapter_jax.errors import CheckpointError
from ipadapter_jax.weights.safetensors_io import SafetensorsFile


class StateDict(Mapping[str, np.ndarray]):
    """A flat, lazily read name -> array mapping over one or more files."""

    def __init__(self, sources: dict[str, Mapping[str, np.ndarray]], description: str):
        self._sources = sources  # key -> the mapping that holds it
        self.description = description

    def __getitem__(self, key: str) -> np.ndarray:
        return self._sources[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)

    def shape(self, key: str) -> tuple[int, ...]:
        src = self._sources[key]
        return src.shape(key) if isinstance(src, SafetensorsFile) else tuple(src[key].shape)


def torch_to_numpy(t) -> np.ndarray:
    """A CPU torch tensor as a numpy array; bfloat16 goes through its bits since numpy has no bfloat16."""
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def load_torch_file(path: str | os.PathLike) -> dict:
    """Load a pickled PyTorch checkpoint safely (`weights_only=True`), tensors as numpy, nesting kept."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} is a pickled PyTorch file and reading it needs torch: "
            "install the torch extra (pip install 'ipadapter-jax[torch]') or convert it to .safetensors."
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist.") from None
    except Exception as e:  # torch raises many types for truncated or foreign pickles
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}).") from None

    def convert(o):
        if isinstance(o, dict):
            return {str(k): convert(v) for k, v in o.items()}
        if isinstance(o, torch.Tensor):
            return torch_to_numpy(o)
        return o

    return convert(obj)


def flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, name + "."))
        elif isinstance(v, np.ndarray):
            out[name] = v
    return out


def open_file(path: str | os.PathLike) -> StateDict:
    """One checkpoint file (.safetensors or a torch pickle), flattened with '.'-joined keys."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist.")
    if path.suffix == ".safetensors":
        f = SafetensorsFile(path)
        return StateDict(dict.fromkeys(f, f), str(path))
    flat = flatten(load_torch_file(path))
    return StateDict(dict.fromkeys(flat, flat), str(path))


def _open_index(index: Path) -> StateDict:
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{index} is not a valid sharded-checkpoint index ({e}).") from None
    opened: dict[str, StateDict] = {}
    sources: dict[str, Mapping] = {}
    for key, shard in weight_map.items():
        if shard not in opened:
            opened[shard] = open_file(index.parent / shard)
        if key not in opened[shard]:
            raise CheckpointError(f"{index} lists {key!r} in {shard}, but that file does not hold it.")
        sources[key] = opened[shard]
    return StateDict(sources, str(index))


def open_weights(folder: str | os.PathLike, basename: str, variant: str | None = None) -> StateDict:
    """The weights of a diffusers/transformers model folder: `{basename}[.{variant}].safetensors`, a sharded
    `*.safetensors.index.json`, or the `.bin` equivalents, in that order of preference."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist.")
    stems = [f"{basename}.{variant}", basename] if variant else [basename]
    for stem in stems:
        for ext in ("safetensors", "bin"):
            single = folder / f"{stem}.{ext}"
            if single.exists():
                return open_file(single)
            index = folder / f"{stem}.{ext}.index.json"
            if index.exists():
                return _open_index(index)
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(
        f"no weights named {basename}[.{variant or ''}].safetensors/.bin in {folder} "
        f"(found: {', '.join(found) or 'nothing'}); "
        "point to a diffusers-format folder or pass the right variant."
    )

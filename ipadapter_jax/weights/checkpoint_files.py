"""Find and open PyTorch checkpoint files: safetensors first, `.bin` through torch, sharded indexes, variants."""

from __future__ import annotations

import hashlib
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

    def __init__(self, sources: dict[str, Mapping[str, np.ndarray]], description: str, files: tuple[Path, ...] = ()):
        self._sources = sources  # key -> the mapping that holds it
        self.description = description
        self.files = files  # what the arrays are read from (the converted-weights cache checks their identity)

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
        return StateDict(dict.fromkeys(f, f), str(path), (path,))
    flat = flatten(load_torch_file(path))
    return StateDict(dict.fromkeys(flat, flat), str(path), (path,))


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
    return StateDict(sources, str(index), (index, *(index.parent / shard for shard in sorted(opened))))


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


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_SAMPLES, _SAMPLE_BYTES = 8, 1 << 16


def weights_fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity of the weights under ``path`` (a file or a model folder): per weight file its name, size
    and a hash of eight 64 KiB samples spread over it. Two folders of the same architecture with other weights
    (same shapes, so same sizes) differ; reading ~0.5 MiB per file keeps it fast for multi-GB checkpoints."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in _WEIGHT_SUFFIXES)
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(root) if file != root else file.name}:{size}".encode())
        with open(file, "rb") as f:
            for i in range(_SAMPLES):
                f.seek(max(0, size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()

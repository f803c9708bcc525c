"""A small reader and writer for the safetensors format, memory-mapped and bfloat16-aware.

The `safetensors` package's numpy backend cannot read bfloat16, and we want truncation and corruption
reported as one clear sentence, so the (simple, documented) format is parsed here directly:
8 bytes little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then raw data.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from ipadapter_jax.errors import CheckpointError

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile(Mapping[str, np.ndarray]):
    """Read-only mapping name -> numpy array view into a memory map of the file (no copy until used)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        hint = "re-download or re-export it"
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path} is not a safetensors file (only {size} bytes); {hint}.")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    raise CheckpointError(f"{self.path} is truncated or not a safetensors file; {hint}.")
                header = json.loads(f.read(n))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            if isinstance(e, FileNotFoundError):
                raise CheckpointError(f"{self.path} does not exist.") from None
            raise CheckpointError(f"{self.path} has a corrupt safetensors header ({e}); {hint}.") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        data_size = size - 8 - n
        for name, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(
                    f"{self.path} has an unsupported or malformed entry for tensor {name!r}; {hint}."
                ) from None
            if end > data_size:
                raise CheckpointError(
                    f"{self.path} is truncated: tensor {name!r} ends at byte {end} of {data_size}; {hint}."
                )
            if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise CheckpointError(f"{self.path} is corrupt: tensor {name!r} has the wrong byte size; {hint}.")
            self._entries[name] = (dtype, shape, start, end)
        self._offset = 8 + n
        self._mmap: np.memmap | None = None

    def _data(self) -> np.memmap:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mmap

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, start, end = self._entries[name]
        raw = self._data()[self._offset + start : self._offset + end]
        return raw.view(dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: dict | None = None):
    """Write tensors to `path` atomically (temp file + rename), keys sorted, 8-byte aligned header."""
    path = Path(path)
    header: dict[str, dict] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    arrays = []
    offset = 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name]).reshape(np.shape(tensors[name]))  # keeps 0-d tensors 0-d
        if a.dtype not in _NAMES:
            raise ValueError(f"cannot store dtype {a.dtype} of tensor {name!r} in safetensors")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        arrays.append(a)
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for a in arrays:
                f.write(a.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()

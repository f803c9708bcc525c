"""Weights already converted to the Flax layout and dtype, kept in a cache folder, so that a later load maps them
instead of transposing every weight again: XLA:CPU adopts 64-byte aligned host memory without a copy, so a load
from this cache touches no weight until the first computation reads it (as PyTorch's memory-mapped loading).

One entry per model file set and conversion: `<key>.bin` holds every parameter 64-byte aligned, `<key>.json` its
offsets, shapes and dtypes and the identity of the files it was made from (resolved path, size, modification
time and sampled content hash); a changed file makes the entry stale and it is rebuilt. The user's files are
never written. An entry is written by a background thread from the arrays a load has just converted in memory,
and committed (its index renamed into place) only after its data reached the disk, so a crash or an early exit
leaves no half-written entry in use; a full disk only skips caching.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from ipadapter_jax.weights.checkpoint_files import weights_fingerprint

FORMAT = 1
ALIGN = 64  # XLA:CPU adopts host buffers aligned to this without a copy
_SPARE_BYTES = 2 << 30  # leave this much disk free


@dataclasses.dataclass(frozen=True)
class Item:
    """One parameter's conversion: checkpoint `key` -> Flax `name`, transposed by `axes`, cast to `dtype`."""

    name: str
    key: str
    axes: tuple[int, ...] | None
    dtype: str
    shape: tuple[int, ...]

    def row(self) -> list:
        return [self.name, self.key, None if self.axes is None else list(self.axes), self.dtype, list(self.shape)]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * jnp.dtype(self.dtype).itemsize


def _identity(files: Sequence[Path]) -> list:
    out = []
    for f in files:
        stat = os.stat(f)
        out.append([str(Path(f).resolve()), stat.st_size, stat.st_mtime_ns, weights_fingerprint(f)])
    return out


def _offsets(items: Sequence[Item]) -> tuple[list[int], int]:
    offsets, end = [], 0
    for item in items:
        end += -end % ALIGN
        offsets.append(end)
        end += item.nbytes
    return offsets, end


class ConvertedWeights:
    """The converted-weights cache in `folder` (created on first write)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.writers: list[threading.Thread] = []  # entries being written in the background

    def _key(self, what: str, files: Sequence[Path], items: Sequence[Item]) -> str:
        rows = [FORMAT, what, [str(Path(f).resolve()) for f in files], [i.row() for i in items]]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:32]

    def read(self, what: str, files: Sequence[Path], items: Sequence[Item]) -> dict[str, np.ndarray] | None:
        """Every item as a read-only view of the mapped entry, or None when there is no current entry."""
        key = self._key(what, files, items)
        try:
            index = json.loads((self.folder / f"{key}.json").read_text())
            if index["identity"] != _identity(files) or index["items"] != [i.row() for i in items]:
                return None
            data = np.memmap(self.folder / f"{key}.bin", dtype=np.uint8, mode="r")
        except (OSError, ValueError, KeyError, TypeError):
            return None
        offsets, end = _offsets(items)
        if data.size != end:
            return None
        return {i.name: data[o:o + i.nbytes].view(jnp.dtype(i.dtype)).reshape(i.shape)
                for i, o in zip(items, offsets, strict=True)}

    def write_later(self, what: str, files: Sequence[Path], items: Sequence[Item],
                    arrays: dict[str, np.ndarray]) -> None:
        """Write an entry from converted host `arrays` (name -> array of the item's shape and dtype) in a
        background thread; the arrays must not change meanwhile."""
        thread = threading.Thread(target=self._write, args=(what, list(files), list(items), arrays),
                                  name="ipadapter-jax-weights-cache", daemon=True)
        self.writers.append(thread)
        thread.start()

    def pending(self) -> bool:
        """Whether an entry is still being written."""
        return any(t.is_alive() for t in self.writers)

    def wait(self) -> None:
        for thread in self.writers:
            thread.join()
        self.writers.clear()

    def _write(self, what, files, items, arrays) -> None:
        try:
            key = self._key(what, files, items)
            identity = _identity(files)
            offsets, end = _offsets(items)
            self.folder.mkdir(parents=True, exist_ok=True)
            self._remove_abandoned()
            if shutil.disk_usage(self.folder).free < end + _SPARE_BYTES:
                return
            tmp = self.folder / f".{key}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                for item, offset in zip(items, offsets, strict=True):
                    f.write(b"\0" * (offset - f.tell()))
                    f.write(np.ascontiguousarray(arrays[item.name]).reshape(-1).view(np.uint8).data)
                f.flush()
                os.fsync(f.fileno())
            (self.folder / f"{key}.json").unlink(missing_ok=True)  # a stale index never describes the new data
            os.replace(tmp, self.folder / f"{key}.bin")
            index = {"format": FORMAT, "what": what, "identity": identity, "items": [i.row() for i in items]}
            index_tmp = self.folder / f".{key}.{os.getpid()}.json.tmp"
            index_tmp.write_text(json.dumps(index))
            os.replace(index_tmp, self.folder / f"{key}.json")  # the commit: readers find the entry from here on
        except OSError:
            pass  # a full or read-only disk: caching is skipped, loading is unaffected

    def _remove_abandoned(self) -> None:
        """Temporary files of processes that ended before committing (killed, or exited while writing)."""
        for tmp in self.folder.glob(".*.tmp"):
            try:
                pid = int(tmp.name.split(".")[2])
                os.kill(pid, 0)
            except ProcessLookupError:
                tmp.unlink(missing_ok=True)
            except (ValueError, IndexError, PermissionError, OSError):
                continue

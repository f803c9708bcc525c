"""The one rename table between Flax NNX parameter paths and PyTorch state-dict keys, and loading through it.

Module paths mirror the PyTorch modules, so a path maps to a key by joining with '.', plus the leaf rules:
linear `kernel` [in, out] <-> `weight` [out, in]; conv `kernel` HWIO <-> `weight` OIHW; norm `scale` and
embedding `embedding` <-> `weight`. Everything else keeps its name and layout.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.errors import CheckpointError
from ipadapter_jax.weights.converted import ConvertedWeights, Item

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def torch_key(path: tuple) -> str:
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, _LEAF_TO_TORCH.get(leaf, leaf)])


def _flax_axes(leaf: str, ndim: int) -> tuple[int, ...] | None:
    """The transpose taking a PyTorch tensor to the Flax layout (None: same layout)."""
    if leaf == "kernel" and ndim == 2:
        return (1, 0)
    if leaf == "kernel" and ndim == 4:
        return (2, 3, 1, 0)
    return None


def to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    axes = _flax_axes(leaf, array.ndim)
    return array if axes is None else array.transpose(axes)


def to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    axes = _flax_axes(leaf, array.ndim)
    return array if axes is None else array.transpose(np.argsort(axes))


# Source rows and columns per tile: 64 KB for a linear weight, 37 KB for a 3x3 conv kernel (inside any L2).
_TILE = {2: 128, 4: 32}
_ALIGN = 64  # XLA:CPU adopts host memory aligned to this without a copy


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = (-raw.ctypes.data) % _ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def flax_layout_copy(array: np.ndarray, axes: tuple[int, ...] | None, dtype) -> np.ndarray:
    """A contiguous, 64-byte aligned copy of `array.transpose(axes)` in `dtype`.

    Large transposes go in tiles over the first two (swapped) axes: numpy's single strided pass misses the
    cache on every element of a large weight; tiles copy a 5120x1280 linear weight or a 1280x1280x3x3 kernel
    2-6x faster."""
    shape = array.shape if axes is None else tuple(array.shape[a] for a in axes)
    out = _aligned_empty(shape, dtype)
    tile = _TILE.get(array.ndim)
    if axes is None or tile is None or array.size < 1 << 16:
        np.copyto(out, array if axes is None else array.transpose(axes), casting="unsafe")
        return out
    rows, cols = array.shape[:2]
    for r in range(0, rows, tile):
        for c in range(0, cols, tile):
            window = {0: slice(r, r + tile), 1: slice(c, c + tile)}
            out[tuple(window.get(a, slice(None)) for a in axes)] = array[r:r + tile, c:c + tile].transpose(axes)
    return out


@dataclass(frozen=True)
class KeyPolicy:
    """How a model's checkpoints differ from the plain table: renamed keys and keys to drop (buffers)."""

    rename: Callable[[str], str] = staticmethod(lambda k: k)
    ignore: tuple[str, ...] = ()  # regexes of checkpoint keys that hold no parameters (e.g. position_ids)

    def ignores(self, key: str) -> bool:
        return any(re.fullmatch(p, key) for p in self.ignore)


def _summarise(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def flat_variables(module_or_state) -> dict[tuple, nnx.Variable]:
    state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state)
    return dict(nnx.to_flat_state(state))


def load_state(
    abstract_module: nnx.Module,
    state_dict: Mapping[str, np.ndarray],
    *,
    dtype=jnp.float32,
    policy: KeyPolicy = KeyPolicy(),
    what: str = "model",
    source: str = "checkpoint",
    sharding: Callable[[tuple, tuple[int, ...]], jax.sharding.Sharding | None] | None = None,
    exclude: Any = nnx.Nothing,
    cache: ConvertedWeights | None = None,
) -> nnx.Module:
    """Fill an abstract module (from `models.layers.abstract_model`) with a checkpoint; every key consumed exactly once.

    Variables matching `exclude` are not in the checkpoint and start as zeros (e.g. IP-Adapter weights).
    `sharding(path, shape)` may place each parameter (for FSDP); by default arrays go to the default device.
    `cache`: converted weights to map instead of converting, kept up to date (`weights/converted.py`).
    """
    graphdef, abstract, extra = nnx.split(abstract_module, nnx.Not(exclude), ...)
    flat = flat_variables(abstract)
    for var in flat_variables(extra).values():  # from host zeros: an eager jnp.zeros compiles once per shape
        var.set_value(jax.device_put(np.zeros(var.shape, jnp.dtype(dtype))))
    wanted = {torch_key(path): path for path in flat}
    present: dict[str, str] = {}
    for key in state_dict:
        if policy.ignores(key):
            continue
        present[policy.rename(key)] = key
    missing = wanted.keys() - present.keys()
    unexpected = present.keys() - wanted.keys()
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_summarise(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_summarise(present[k] for k in unexpected)}")
        raise CheckpointError(
            f"{source} does not match the {what} architecture from its config ({'; '.join(parts)}); "
            "check that the weights and config.json belong together."
        )
    mismatched, jobs = [], []
    for key, path in wanted.items():
        var = flat[path]
        array = state_dict[present[key]]  # a lazy view of the memory map
        axes = _flax_axes(str(path[-1]), array.ndim)
        shape = tuple(array.shape) if axes is None else tuple(array.shape[a] for a in axes)
        if shape != tuple(var.shape):
            mismatched.append(f"{present[key]} {shape} vs {tuple(var.shape)}")
            continue
        target = var.dtype if jnp.issubdtype(var.dtype, jnp.integer) else dtype
        jobs.append((path, array, axes, target, sharding(path, var.shape) if sharding else None))
    if mismatched:
        raise CheckpointError(
            f"{source} has tensors whose shapes do not fit the {what} config (checkpoint vs model): "
            f"{_summarise(mismatched, 5)}; the weights belong to another model size."
        )
    items = [Item("/".join(map(str, path)), present[torch_key(path)], axes, jnp.dtype(target).name,
                  tuple(flat[path].shape)) for path, _, axes, target, _ in jobs]
    files = getattr(state_dict, "files", ())
    converted = cache.read(what, files, items) if cache is not None and files else None
    if converted is not None:  # mapped, already in layout and dtype
        values = _place_all({job[0]: (converted[item.name], job[4]) for job, item in zip(jobs, items, strict=True)})
    else:
        # Reading, transposing and converting release the GIL: a few threads load several times faster.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            hosts = dict(zip((j[0] for j in jobs), pool.map(lambda j: _host(*j[1:]), jobs), strict=True))
        values = _place_all({job[0]: (hosts[job[0]], job[4]) for job in jobs})
        if cache is not None and files:
            named = {item.name: hosts[job[0]] for job, item in zip(jobs, items, strict=True)}
            cache.write_later(what, files, items, named)
    for path, var in flat.items():
        var.set_value(values[path])
    return nnx.merge(graphdef, abstract, extra)


def _host(array: np.ndarray, axes: tuple[int, ...] | None, dtype, sharding) -> np.ndarray:
    """The parameter in the Flax layout and `dtype`, on the host."""
    on_cpu = jax.default_backend() == "cpu"
    if axes is None and array.dtype == np.dtype(dtype) and (sharding is not None or not on_cpu):
        return array  # already in layout and dtype: accelerators and shards copy from the memory map directly
    return flax_layout_copy(array, axes, dtype)


def _place_all(hosts: dict) -> dict:
    """{path: (host array, sharding or None)} -> {path: jax.Array}. On CPU, XLA adopts 64-byte aligned host memory
    (a converted copy, or a mapped cache entry that is then read only when used) instead of copying it. Unsharded
    arrays go in one batched `device_put` (per-array calls cost about 0.5 ms each, a second for an SD1.5 pipeline)."""
    out = {}
    plain = [path for path, (_, sharding) in hosts.items() if sharding is None]
    for path, array in zip(plain, jax.device_put([hosts[p][0] for p in plain]), strict=True):
        out[path] = array
    for path, (host, sharding) in hosts.items():
        if sharding is not None:
            out[path] = jax.make_array_from_callback(host.shape, sharding, lambda idx, host=host: host[idx])
    return out


def export_state(module_or_state, *, dtype=None, filter=nnx.Param) -> dict[str, np.ndarray]:
    """The module's parameters as a PyTorch-layout state dict of host numpy arrays."""
    state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state, filter)
    out: dict[str, np.ndarray] = {}
    for path, var in nnx.to_flat_state(state):
        array = np.asarray(jax.device_get(var.get_value()))
        if dtype is not None:
            array = array.astype(dtype)
        out[torch_key(path)] = np.ascontiguousarray(to_torch_layout(str(path[-1]), array))
    return out

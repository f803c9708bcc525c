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

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def torch_key(path: tuple) -> str:
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, _LEAF_TO_TORCH.get(leaf, leaf)])


def to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array


def to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    return array


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
) -> nnx.Module:
    """Fill an abstract module (from `nnx.eval_shape`) with a checkpoint; every key consumed exactly once.

    Variables matching `exclude` are not in the checkpoint and start as zeros (e.g. IP-Adapter weights).
    `sharding(path, shape)` may place each parameter (for FSDP); by default arrays go to the default device.
    """
    graphdef, abstract, extra = nnx.split(abstract_module, nnx.Not(exclude), ...)
    flat = flat_variables(abstract)
    for var in flat_variables(extra).values():
        var.set_value(jnp.zeros(var.shape, dtype))
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
        array = to_flax_layout(str(path[-1]), state_dict[present[key]])  # a lazy view of the memory map
        if tuple(array.shape) != tuple(var.shape):
            mismatched.append(f"{present[key]} {tuple(array.shape)} vs {tuple(var.shape)}")
            continue
        target = var.dtype if jnp.issubdtype(var.dtype, jnp.integer) else dtype
        jobs.append((path, array, target, sharding(path, var.shape) if sharding else None))
    if mismatched:
        raise CheckpointError(
            f"{source} has tensors whose shapes do not fit the {what} config (checkpoint vs model): "
            f"{_summarise(mismatched, 5)}; the weights belong to another model size."
        )
    # Reading, transposing and converting release the GIL: a few threads load several times faster.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        values = dict(zip((j[0] for j in jobs), pool.map(lambda j: _place(*j[1:]), jobs), strict=True))
    for path, var in flat.items():
        var.set_value(values[path])
    return nnx.merge(graphdef, abstract, extra)


def _place(array: np.ndarray, dtype, sharding) -> jax.Array:
    host = np.ascontiguousarray(array, dtype=dtype)
    if sharding is None:
        return jnp.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


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

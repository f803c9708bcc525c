"""Build a model abstractly from its folder's config.json, then fill it from the folder's weights."""

from __future__ import annotations

import functools
import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.errors import CheckpointError, ConfigError
from ipadapter_jax.models.layers import abstract_model
from ipadapter_jax.weights.checkpoint_files import open_weights
from ipadapter_jax.weights.converted import ConvertedWeights
from ipadapter_jax.weights.torch_layout import KeyPolicy, load_state

DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
          "float16": jnp.float16, "fp16": jnp.float16}


def as_dtype(dtype: Any):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not supported; use float32, bfloat16 or float16.")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type if dtype is not None else jnp.float32


def gc_paused(load: Callable) -> Callable:
    """`load` with Python's cyclic garbage collector paused: building and filling models allocates ~10^5 small
    objects, none of them garbage, and every allocation threshold set off a collection over all of them (about
    0.1 s of an SD1.5 pipeline load on a 2-core AMD EPYC). Collection resumes, if it was on, when `load` returns."""

    @functools.wraps(load)
    def paused(*args, **kwargs):
        enabled = gc.isenabled()
        gc.disable()
        try:
            return load(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return paused


def read_config(folder: str | Path, name: str = "config.json") -> dict:
    path = Path(folder) / name
    if not Path(folder).is_dir():
        raise CheckpointError(f"model folder {folder} does not exist; check the path or the pipeline's subfolders.")
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no {name}; it is not a diffusers/transformers model folder.") from None
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}).") from None


def load_component(folder: str | Path, build: Callable[[], nnx.Module], *, basename: str, dtype=jnp.float32,
                   variant: str | None = None, policy: KeyPolicy | None = None, what: str = "model",
                   sharding=None, exclude: Any = nnx.Nothing, cache: ConvertedWeights | None = None) -> nnx.Module:
    """`build()` constructs the model; it runs under `abstract_model`, so no random initialisation happens."""
    abstract = abstract_model(build)
    weights = open_weights(folder, basename, variant)
    return load_state(abstract, weights, dtype=as_dtype(dtype), policy=policy or KeyPolicy(), what=what,
                      source=weights.description, sharding=sharding, exclude=exclude, cache=cache)

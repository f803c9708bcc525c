"""What this project keeps between runs, under one folder: JAX's compiled programs (`jax/`) and weights converted
to the Flax layout (`weights/`, see `weights/converted.py`). Only a process the project owns (the CLI, benchmarks)
turns them on, as with `xla_flags.py`; importing the library never does.

The folder is `$IPADAPTER_JAX_CACHE`, else `$XDG_CACHE_HOME/ipadapter-jax`, else `~/.cache/ipadapter-jax`.
`IPADAPTER_JAX_COMPILE_CACHE=0` / `IPADAPTER_JAX_WEIGHTS_CACHE=0` (or the CLI's `--no-compile-cache` /
`--no-weights-cache`) turn either off.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT_VARIABLE = "IPADAPTER_JAX_CACHE"
COMPILE_VARIABLE = "IPADAPTER_JAX_COMPILE_CACHE"
WEIGHTS_VARIABLE = "IPADAPTER_JAX_WEIGHTS_CACHE"


def cache_root(environ: Mapping[str, str] = os.environ) -> Path:
    if environ.get(ROOT_VARIABLE):
        return Path(environ[ROOT_VARIABLE]).expanduser()
    base = environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ipadapter-jax"


def _enabled(variable: str, environ: Mapping[str, str]) -> bool:
    return environ.get(variable, "1").strip().lower() not in ("0", "false", "no", "off")


def compile_cache_folder(environ: Mapping[str, str] = os.environ) -> Path | None:
    return cache_root(environ) / "jax" if _enabled(COMPILE_VARIABLE, environ) else None


def weights_cache_folder(environ: Mapping[str, str] = os.environ) -> Path | None:
    return cache_root(environ) / "weights" if _enabled(WEIGHTS_VARIABLE, environ) else None


@contextlib.contextmanager
def compile_cache(folder: Path | None) -> Iterator[None]:
    """JAX's persistent compilation cache in `folder` while the block runs (None: leave JAX as it is).

    Every program is kept, however quick to compile: a generation compiles a dozen small ones besides the
    denoising loop, and a new process should compile none of them. Keys hold the program and the compile options
    (XLA flags included), never traced values, so new scales, guidance or seeds reuse the entries.
    """
    if folder is None:
        yield
        return
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    settings = {"jax_compilation_cache_dir": str(folder), "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": -1}
    previous = {name: getattr(jax.config, name) for name in settings}
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        yield  # an unwritable cache folder costs speed, never the run
        return
    for name, value in settings.items():
        jax.config.update(name, value)
    cc.reset_cache()  # JAX decides once per process whether a cache is in use; decide again with the folder set
    try:
        yield
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        cc.reset_cache()

"""Where commands write: checked before any work starts (never over an input, never over an existing file
without --overwrite, only where a file can be created) and written atomically."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ipadapter_jax.errors import UserError


def check_outputs(paths: Iterable[str | os.PathLike], *, inputs: Iterable[str | os.PathLike] = (),
                  overwrite: bool = False, flag: str = "--out") -> None:
    """Each output path can be written: not a folder, not one of `inputs` (even with `overwrite`), new unless
    `overwrite`, and under a folder that exists or can be created and is writable. One listing per folder, so
    thousands of numbered outputs cost one system call each at most."""
    given = {Path(p).resolve() for p in inputs if p is not None and Path(p).exists()}
    folders: dict[Path, list[Path]] = {}
    for path in map(Path, paths):
        folders.setdefault(path.parent, []).append(path)
    for folder, group in folders.items():
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise UserError(f"{flag} {group[0]} cannot be created: {existing} is a file, not a folder.")
        if not os.access(existing, os.W_OK):
            raise UserError(f"{flag} {group[0]} cannot be written: {existing} is not writable; choose another {flag}.")
        present = set(os.listdir(folder)) if folder.is_dir() else set()
        for path in group:
            if path.name not in present:
                continue
            if path.is_dir():
                raise UserError(f"{flag} {path} is a folder; give a file path.")
            if path.resolve() in given:
                raise UserError(f"{flag} {path} is one of the inputs; choose another {flag}.")
            if not overwrite:
                raise UserError(f"{path} already exists; choose another {flag} or pass --overwrite.")


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """`np.save` to exactly `path`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()

"""Rematerialisation per UNet block: `set_remat(unet, "dots_no_batch")` makes every ResNet and transformer
block recompute its activations in the backward pass under a `jax.checkpoint` policy, so training keeps only
each block's inputs (and what the policy saves) instead of every intermediate."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from ipadapter_jax.errors import ConfigError

POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def policy(name: str | None):
    if name is not None and name not in POLICIES:
        raise ConfigError(f"remat policy {name!r} is unknown; use one of {', '.join(POLICIES)}.")
    return None if name is None else POLICIES[name]


def set_remat(root: nnx.Module, name: str | None) -> int:
    """Set the policy on every block that supports it (before `nnx.split`); returns how many blocks."""
    policy(name)
    count = 0
    for _, module in nnx.iter_modules(root):
        if hasattr(module, "remat_policy"):
            module.remat_policy = None if name == "none" else name
            count += 1
    return count


def call(module: nnx.Module, forward, *args):
    """`forward(module, *args)`, under `jax.checkpoint` when the module has a remat policy. The module's
    state goes in as an argument, so the backward pass recomputes the block from its inputs and weights."""
    name = getattr(module, "remat_policy", None)
    if name is None:
        return forward(module, *args)
    graphdef, state = nnx.split(module)

    def pure(state, *args):
        return forward(nnx.merge(graphdef, state), *args)

    return jax.checkpoint(pure, policy=policy(name))(state, *args)

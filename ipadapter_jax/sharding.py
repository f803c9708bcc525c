"""Device meshes and parameter placement as data: a mesh spec and ordered regex -> rule pairs.

Mesh axes are ``data`` (pure data parallelism) and ``fsdp`` (data parallelism whose replicas also split
the parameters). The batch is split over both. A parameter path is its module path joined by ``/``
(``unet/down_blocks/0/attentions/0/transformer_blocks/0/attn2/to_k/kernel``); the first rule whose regex
matches the whole path places it. A rule is one of:

- ``"replicated"``: every device holds all of it;
- ``"fsdp"``: split its largest dimension that the ``fsdp`` axis divides over ``fsdp`` (replicated when none
  does, e.g. small biases), as big_vision's FSDP rule;
- a PartitionSpec as a list, one entry per leading dimension: a mesh axis, a list of axes, or null
  (``[null, fsdp]``); the named axes must divide that dimension.

A path no rule matches is an error naming it; end the list with ``[".*", ...]`` for a default.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ipadapter_jax.errors import ConfigError

AXES = ("data", "fsdp")
BATCH_SPEC = P(AXES)  # the leading (batch) axis over every device

# Frozen base split FSDP-style; the adapter (small, and read by every layer's image branch) replicated,
# so its optimizer state is too (set the adapter rules to "fsdp" to shard it as ZeRO does).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    (r"image_proj/.*", "replicated"),
    (r".*/to_[kv]_ip/.*", "replicated"),
    (r".*", "fsdp"),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one may be -1 (all remaining devices). ``rules`` place parameters (module doc)."""

    data: int = -1
    fsdp: int = 1
    rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES
    # `mesh: auto` in a recipe: training chooses (data, fsdp), the remat policy and the microbatch for the
    # devices it runs on, as `ipadapter-jax plan` does (planning/search.py); data and fsdp are then ignored.
    auto: bool = False

    @classmethod
    def from_text(cls, text: str, where: str) -> MeshConfig:
        """The section written as one word: `mesh: auto`."""
        if text.strip().lower() != "auto":
            raise ConfigError(f"Config key {where!r} is a section (data, fsdp, rules) or the word auto, "
                              f"not {text!r}.")
        return cls(auto=True)

    def __post_init__(self):
        sizes = (self.data, self.fsdp)
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            raise ConfigError(f"mesh sizes data={self.data}, fsdp={self.fsdp} must be positive, "
                              "with at most one -1 (filled with the remaining devices).")
        for i, rule in enumerate(self.rules):
            if len(rule) != 2 or not isinstance(rule[0], str):
                raise ConfigError(f"mesh.rules[{i}] must be [regex, rule], got {rule!r}.")
            try:
                re.compile(rule[0])
            except re.error as e:
                raise ConfigError(f"mesh.rules[{i}] regex {rule[0]!r} is invalid ({e}).") from None
            _check_rule(rule[1], f"mesh.rules[{i}]")


def axis_sizes(config: MeshConfig, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) with the -1 axis filled; an error naming the sizes when they do not fit the devices."""
    sizes = [config.data, config.fsdp]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh data={config.data}, fsdp={config.fsdp}: {num_devices} devices are not a "
                              f"multiple of {known}.")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh data={sizes[0]} x fsdp={sizes[1]} needs {math.prod(sizes)} devices, but "
                          f"{num_devices} are available; set one axis to -1.")
    return sizes[0], sizes[1]


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "fsdp")`` mesh over ``devices`` (default: all devices of all processes).

    ``fsdp`` is the inner axis, so its all-gathers stay within a host (ICI/NVLink) where possible.
    """
    if config.auto:
        raise ConfigError("mesh: auto is chosen by `train` and `ipadapter-jax plan` (planning/search.py); resolve it "
                          "with planning.search.choose before building a mesh, or give mesh.data and mesh.fsdp.")
    devices = list(jax.devices() if devices is None else devices)
    shape = axis_sizes(config, len(devices))
    if len(devices) == len(jax.devices()) and devices == list(jax.devices()):
        try:
            grid = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.asarray(devices).reshape(shape)
    else:
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES)


def _check_rule(rule: Any, where: str) -> None:
    if rule in ("replicated", "fsdp"):
        return
    if not isinstance(rule, (list, tuple)):
        raise ConfigError(f"{where}: rule {rule!r} must be 'replicated', 'fsdp' or a list of mesh axes/null.")
    for entry in rule:
        names = entry if isinstance(entry, (list, tuple)) else [entry]
        for name in names:
            if name is not None and name not in AXES:
                raise ConfigError(f"{where}: {name!r} is not a mesh axis ({', '.join(AXES)}).")


def spec_for(path: str, shape: Sequence[int], rules: Iterable[tuple[str, Any]], mesh: Mesh) -> P:
    """The PartitionSpec of the parameter at ``path`` under the first matching rule."""
    for pattern, rule in rules:
        if re.fullmatch(pattern, path):
            return _apply(rule, path, tuple(shape), mesh)
    raise ConfigError(f"No mesh rule matches parameter {path!r}; add a rule (e.g. ['.*', 'fsdp']) at the end.")


def _apply(rule: Any, path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    if rule == "replicated":
        return P()
    if rule == "fsdp":
        n = mesh.shape["fsdp"]
        if n == 1:
            return P()
        candidates = [i for i, d in enumerate(shape) if d % n == 0]
        if not candidates:
            return P()
        axis = max(candidates, key=lambda i: (shape[i], i))
        return P(*[("fsdp" if i == axis else None) for i in range(len(shape))])
    entries = list(rule)
    if len(entries) > len(shape):
        raise ConfigError(f"Mesh rule {rule!r} has {len(entries)} entries for parameter {path!r} of shape "
                          f"{shape}.")
    for dim, entry in zip(shape, entries, strict=False):
        names = entry if isinstance(entry, (list, tuple)) else [entry]
        n = math.prod(mesh.shape[a] for a in names if a is not None)
        if dim % n:
            raise ConfigError(f"Mesh rule {rule!r} splits a dimension of {dim} of parameter {path!r} "
                              f"{shape} over {n} devices; use 'fsdp' or a rule that divides it.")
    return P(*[tuple(e) if isinstance(e, list) else e for e in entries])


def tree_shardings(flat: Mapping[str, Any], rules, mesh: Mesh) -> dict[str, NamedSharding]:
    """``NamedSharding`` per entry of a flat ``{path: array or ShapeDtypeStruct}`` dict."""
    return {path: NamedSharding(mesh, spec_for(path, np.shape(x), rules, mesh)) for path, x in flat.items()}


def placer(mesh: Mesh, rules: Iterable[tuple[str, Any]] = DEFAULT_RULES, prefix: str = ""):
    """``(path tuple, shape) -> NamedSharding`` for the loaders' ``sharding=`` argument: weights are placed by
    the rules as they load, under ``prefix`` (e.g. ``"unet/"``)."""
    return lambda path, shape: NamedSharding(mesh, spec_for(prefix + "/".join(map(str, path)), shape, rules, mesh))


def like_params(abstract_tree: Any, param_shardings: Mapping[str, NamedSharding], mesh: Mesh) -> Any:
    """Shardings for a pytree whose dict entries keyed by parameter path mirror the parameters (optimizer
    moments); every other leaf (step counts, scalars) is replicated."""
    replicated = NamedSharding(mesh, P())

    def one(keypath, leaf):
        for key in reversed(keypath):
            name = getattr(key, "key", None)
            if isinstance(name, str) and name in param_shardings:
                sharding = param_shardings[name]
                return sharding if len(sharding.spec) <= np.ndim(leaf) else replicated
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())

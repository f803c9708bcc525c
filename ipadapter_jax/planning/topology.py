"""TPU slices by name, their chips' HBM and peaks, and their devices for compiling without a TPU (libtpu).

Names follow Cloud TPU's accelerator types: v5e-N and v6e-N count chips (v5e-8 is a 2x4 slice); v4-N and
v5p-N count TensorCores, two per chip (v5p-8 is 4 chips, 2x2x1; v5p-128 is 64 chips, 4x4x4). The raw
`v5p:4x4x4` form (chips per axis, as `jax.experimental.topologies` spells it) is accepted too.
"""

from __future__ import annotations

import dataclasses
import math
import re

from ipadapter_jax.errors import ConfigError, UserError

INSTALL_HINT = 'pip install -e ".[tpu]"  (jax[tpu]: libtpu, the TPU compiler)'
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    peak_bf16_flops: float  # dense, per chip (Cloud TPU documentation)
    hbm_bytes_per_s: float
    cores_per_chip: int  # TensorCores counted by the accelerator-type suffix (2 on v4/v5p, 1 on v5e/v6e)
    grids: dict  # chips -> the standard slice shape
    # The fractions of the peaks at which libtpu's cost model prices matrix work and HBM traffic (planning/ops.py):
    # read from one Pallas kernel and one elementwise operation compiled alone with libtpu 0.0.42.1, and checked
    # against the compiler by tests/planning/tpu_worker.py. So on v5p the compiler's best step is 85.8% MFU (its
    # XLA matrix products price at 85.4%), on v5e and v6e 100%.
    compiler_flops_share: float = 1.0
    compiler_bytes_share: float = 1.0


_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8",
       1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}

CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1200e9, 2, _3D, 0.498, 0.409),  # as if one of its two TensorCores
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, 1, _2D, 1.0, 0.90),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, 2, _3D, 0.858, 0.85),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9, 1, _2D, 1.0, 1.0),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    chip: Chip
    shape: tuple[int, ...]  # chips per axis
    num_slices: int = 1

    @property
    def name(self) -> str:
        """The raw form, `v5p:4x4x4`."""
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

    @property
    def accelerator_type(self) -> str:
        return f"{self.chip.name}-{self.chips_per_slice * self.chip.cores_per_chip}"

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    def devices(self) -> list:
        """The slice's devices as the TPU compiler sees them (needs libtpu; no TPU)."""
        import importlib.util

        if importlib.util.find_spec("libtpu") is None:
            raise UserError(f"compiling for a TPU slice needs libtpu, the TPU compiler, which is not installed: "
                            f"{INSTALL_HINT}.")
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=self.name, chip_config_name="default",
            chips_per_host_bounds=_host_bounds(self.shape), num_slices=self.num_slices)
        return list(desc.devices)


def _host_bounds(shape: tuple[int, ...]) -> tuple[int, int, int]:
    # Four chips per host (2x2x1), or the whole slice when it is smaller.
    dims = (list(shape) + [1, 1, 1])[:3]
    return (min(2, dims[0]), min(2, dims[1]), 1)


def _valid_names() -> str:
    names = []
    for chip in CHIPS.values():
        sizes = sorted(chip.grids)
        names.append(f"{chip.name}-{{{','.join(str(n * chip.cores_per_chip) for n in sizes)}}}")
    return "; ".join(names) + "; or the raw form such as v5p:4x4x4 or v5e:2x4"


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """`v5p-64`, `v5e-256`, `v6e-8` or `v5p:4x4x4`; a UserError naming the valid ones otherwise."""
    if num_slices < 1:
        raise ConfigError(f"--slices must be at least 1, not {num_slices}.")
    text = name.strip().lower()
    raw = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)+)", text)
    if raw:
        chip = CHIPS.get(raw.group(1))
        shape = tuple(int(x) for x in raw.group(2).split("x"))
        if chip is None or len(shape) != len(next(iter(chip.grids.values())).split("x")) or min(shape) < 1:
            raise UserError(f"TPU topology {name!r} is not known; valid: {_valid_names()}.")
        return Topology(chip, shape, num_slices)
    typed = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text)
    chip = CHIPS.get(typed.group(1)) if typed else None
    if chip is not None:
        cores = int(typed.group(2))
        chips, rem = divmod(cores, chip.cores_per_chip)
        if not rem and chips in chip.grids:
            return Topology(chip, tuple(int(x) for x in chip.grids[chips].split("x")), num_slices)
    raise UserError(f"TPU topology {name!r} is not known; valid: {_valid_names()}.")

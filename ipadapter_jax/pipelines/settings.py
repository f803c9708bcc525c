"""Generation settings as users give them (CLI flags, manifest items, Python arguments), checked at the boundary:
NaN, infinity, wrong types and values outside their range are refused with one sentence naming the accepted
range; requests whose buffers cannot fit in memory are refused with the bytes they need."""

from __future__ import annotations

import math
import os
from numbers import Integral, Real
from pathlib import Path

import jax
import numpy as np

from ipadapter_jax.errors import UserError

MAX_STEPS = 1000  # the training schedule's length for every Stable Diffusion release


def number(name: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           integer: bool = False):
    """`value` as an int or float within [low, high] ((low, high] with `low_open`); else a UserError."""
    kind = "an integer" if integer else "a number"
    bounds = _describe(low, high, low_open)
    if isinstance(value, bool) or not isinstance(value, Integral if integer else Real) or (
            not integer and not math.isfinite(value)):
        raise UserError(f"{name} must be {kind}{bounds}, not {value!r}.")
    below = low is not None and (value <= low if low_open else value < low)
    if below or (high is not None and value > high):
        raise UserError(f"{name} must be {kind}{bounds}, not {value!r}.")
    return int(value) if integer else float(value)


def _describe(low, high, low_open: bool) -> str:
    def fmt(x) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"

    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{fmt(low)}, {fmt(high)}]"
    if low is not None:
        return f" {'>' if low_open else '>='} {fmt(low)}"
    return f" <= {fmt(high)}" if high is not None else ""


def check_generation(*, steps, guidance, guidance_rescale=0.0, eta=0.0, strength=None, ip_window=(0.0, 1.0),
                     num_images=1, seed=0) -> None:
    """The sampling settings every entry point shares."""
    number("steps", steps, low=1, high=MAX_STEPS, integer=True)
    for value in (guidance if isinstance(guidance, (list, tuple)) else [guidance]):
        number("guidance", value, low=0.0)
    for value in (guidance_rescale if isinstance(guidance_rescale, (list, tuple)) else [guidance_rescale]):
        number("guidance_rescale", value, low=0.0, high=1.0)
    number("eta", eta, low=0.0, high=1.0)
    if strength is not None:
        number("strength", strength, low=0.0, high=1.0, low_open=True)
    if not isinstance(ip_window, (list, tuple)) or len(ip_window) != 2:
        raise UserError(f"ip_window must be [start, end], two fractions of the steps, not {ip_window!r}.")
    start = number("the IP window's start", ip_window[0], low=0.0, high=1.0)
    end = number("the IP window's end", ip_window[1], low=0.0, high=1.0)
    if start > end:
        raise UserError(f"the IP window starts after it ends ({start:g} > {end:g}); give start <= end, e.g. "
                        f"--ip-start {end:g} --ip-end {start:g}.")
    number("the number of images", num_images, low=1, integer=True)
    number("seed", seed, low=0, high=2**32 - 1, integer=True)


def device_memory_bytes(device: jax.Device) -> int | None:
    """What one device can hold: its allocator limit on accelerators, physical memory on CPU (None: unknown)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


def check_fits(rows_per_device: int, height: int, width: int, vae_channels: int, dtype_bytes: int,
               device: jax.Device) -> None:
    """Refuse a request whose VAE decoder alone cannot fit: its last block holds at least two activations of
    rows x height x width x `vae_channels` (input and output of a convolution) at full resolution."""
    need = 2 * rows_per_device * height * width * vae_channels * dtype_bytes
    have = device_memory_bytes(device)
    if have is not None and need > have:
        raise UserError(f"{rows_per_device} image(s) of {height}x{width} per device need at least {need / 2**30:.1f} "
                        f"GiB for the VAE decoder alone, more than the {have / 2**30:.1f} GiB a {device.platform} "
                        "device has; lower the size or the number of images.")


def load_array(path, what: str) -> np.ndarray:
    """A finite numeric array from a `.npy` file, or a UserError naming `what` and the problem."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; pass a .npy file.")
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; check the path.")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{what} {path} is not a readable .npy array ({e}).") from None
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise UserError(f"{what} {path} must hold real numbers, not {getattr(array, 'dtype', type(array))}.")
    if not np.isfinite(array).all():
        raise UserError(f"{what} {path} holds NaN or infinite values.")
    return array

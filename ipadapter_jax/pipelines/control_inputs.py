"""ControlNet inputs as users give them (Python arguments, CLI flags, manifest items), checked at the boundary:
control images (loaded, optionally turned into edge maps, then resized to the output size as diffusers does), and
per ControlNet a conditioning scale and a [start, end] window of the denoising steps.

    per_controlnet([0.5], 2, "--control-scale")            -> [0.5, 0.5]
    control_rows(images, scales, starts, ends, ...)        -> what `ControlGuidance` holds, as host arrays
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ipadapter_jax import images as imaging
from ipadapter_jax.errors import UserError
from ipadapter_jax.generation.controlnet import keep_table
from ipadapter_jax.pipelines.settings import number

CANNY_DEFAULT = (100.0, 200.0)  # the thresholds of diffusers' ControlNet canny examples
OPENCV_HINT = "pip install 'ipadapter-jax[cv]'"


def per_controlnet(values, n: int, what: str, *, once: bool = True) -> list:
    """One entry per ControlNet from `values` given once per ControlNet, or (`once`) a single one for all."""
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if once and len(values) == 1:
        return values * n
    if len(values) != n:
        either = " (or one for all)" if once else ""
        raise UserError(f"{what} needs one entry per ControlNet ({n}, in the order the ControlNets were given)"
                        f"{either}, got {len(values)}.")
    return values


def check_control_settings(scales: Sequence, starts: Sequence, ends: Sequence) -> None:
    """Finite scales and 0 <= start <= end <= 1 for every ControlNet."""
    for scale in scales:
        for value in scale if isinstance(scale, (list, tuple, np.ndarray)) else [scale]:
            number("the ControlNet conditioning scale", value)
    for start, end in zip(starts, ends, strict=True):
        start = number("the ControlNet window's start", start, low=0.0, high=1.0)
        end = number("the ControlNet window's end", end, low=0.0, high=1.0)
        if start > end:
            raise UserError(f"the ControlNet window starts after it ends ({start:g} > {end:g}); give start <= end, "
                            f"e.g. --control-start {end:g} --control-end {start:g}.")


def parse_preprocess(text: str | None) -> tuple[str, tuple[float, float]] | None:
    """'canny' or 'canny:low,high' -> ("canny", (low, high)); None stays None."""
    if text is None:
        return None
    name, _, args = text.partition(":")
    if name != "canny":
        raise UserError(f"--control-preprocess {text!r} is unknown; use canny or canny:low,high (e.g. canny:100,200).")
    if not args:
        return name, CANNY_DEFAULT
    parts = args.split(",")
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise UserError(f"--control-preprocess {text!r} must give two thresholds, canny:low,high (e.g. "
                        "canny:100,200).") from None
    low = number("the canny low threshold", low, low=0.0, high=1000.0)
    high = number("the canny high threshold", high, low=low, high=1000.0)
    return name, (low, high)


def require_opencv():
    """The `cv2` module, or a one-sentence UserError naming the extra that installs it."""
    try:
        import cv2
    except ImportError:
        raise UserError(f"canny edge detection (--control-preprocess canny) needs OpenCV, which is not installed; "
                        f"{OPENCV_HINT}.") from None
    return cv2


def canny_edges(image, low: float = CANNY_DEFAULT[0], high: float = CANNY_DEFAULT[1]) -> imaging.Image.Image:
    """White edges on black, as 3-channel RGB (OpenCV's Canny on the RGB pixels, as diffusers' examples do)."""
    cv2 = require_opencv()
    edges = cv2.Canny(np.asarray(imaging.load_image(image, what="control image")), low, high)
    return imaging.Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def load_control_image(image, preprocess: tuple[str, tuple[float, float]] | None = None) -> imaging.Image.Image:
    """A control image as RGB, edge-detected when `preprocess` says so."""
    loaded = imaging.load_image(image, what="control image")
    return canny_edges(loaded, *preprocess[1]) if preprocess else loaded


def control_items(control_image, n: int, prompts: int, per_prompt: int) -> list[list] | None:
    """Per ControlNet, one loaded image per item (prompt-major, as a call's batch is laid out) from what a call
    gives: one entry per ControlNet (a bare image when there is one), each an image or one per prompt."""
    if (control_image is None) != (n == 0):
        raise UserError(f"{n} ControlNet(s) are loaded; pass control_image (one per ControlNet)." if n else
                        "control images were given but no ControlNet is loaded; pass controlnets to from_pretrained.")
    if not n:
        return None
    given = [control_image] if n == 1 and not isinstance(control_image, (list, tuple)) else list(control_image)
    out = []
    for entry in per_controlnet(given, n, "control_image", once=False):
        images = list(entry) if isinstance(entry, (list, tuple)) else [entry]
        if len(images) not in (1, prompts):
            raise UserError(f"give one control image per ControlNet, or one per prompt ({prompts}), not {len(images)}.")
        loaded = [imaging.load_image(i, what="control image") for i in images]
        out.append([loaded[0 if len(loaded) == 1 else p] for p in range(prompts) for _ in range(per_prompt)])
    return out


def control_rows(images: Sequence[Sequence], scales: Sequence, starts: Sequence[float], ends: Sequence[float], *,
                 batch: int, height: int, width: int, num_steps: int) -> tuple[list[np.ndarray], np.ndarray,
                                                                             np.ndarray]:
    """Per ControlNet (B, H, W, 3) float32 pixels in [0, 1] (one image per item), (n, B) scales and the (n, steps)
    keep-table. `images[k]`: one image, or one per item; `scales[k]`: one value, or one per item."""
    n = len(images)
    pixels = []
    for k, given in enumerate(images):
        items = list(given) if isinstance(given, (list, tuple)) else [given] * batch
        if len(items) != batch:
            raise UserError(f"ControlNet {k} got {len(items)} control images for a batch of {batch}; give one image "
                            "or one per prompt.")
        cache: dict = {}  # a file or image shared by several items is read and resized once
        for item in items:
            key = os.fspath(item) if isinstance(item, (str, os.PathLike)) else id(item)
            if key not in cache:
                cache[key] = imaging.control_input(item, height, width)
        pixels.append(np.stack([cache[os.fspath(i) if isinstance(i, (str, os.PathLike)) else id(i)] for i in items]))
    rows = np.zeros((n, batch), np.float32)
    for k, scale in enumerate(scales):
        rows[k] = np.broadcast_to(np.asarray(scale, np.float32), (batch,))
    check_control_settings([list(r) for r in rows], starts, ends)
    return pixels, rows, keep_table(starts, ends, num_steps)

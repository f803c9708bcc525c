"""Negative-image noise: the image whose embeddings form the unconditional branch, made from noise (the noise
types of ComfyUI_IPAdapter_plus, implemented from their definitions). Host-side NumPy; deterministic for a given
source image: the seed is int(sum of its pixels in [0, 1]) mod 1e9+7, and the source defaults to black 224x224."""

from __future__ import annotations

import numpy as np

from ipadapter_jax.errors import UserError

NOISE_TYPES = ("fade", "dissolve", "gaussian", "shuffle")
DEFAULT_STRENGTH = 1.0
DEFAULT_SIZE = 224
_PRIME = 1_000_000_007
_ALPHA, _SIGMA = 75.0, 3.5  # the shuffle's elastic warp: alpha, and sigma at strength 0


def parse_negative_noise(text: str) -> tuple[str, float]:
    """"fade", "shuffle:0.4", ... -> (type, strength in [0, 1]; default 1)."""
    kind, _, strength = str(text).strip().lower().partition(":")
    try:
        value = float(strength) if strength else DEFAULT_STRENGTH
    except ValueError:
        value = -1.0
    if kind not in NOISE_TYPES or not 0.0 <= value <= 1.0:
        raise UserError(f"negative noise {text!r} is not valid; use one of {', '.join(NOISE_TYPES)}, optionally "
                        "with a strength in [0, 1] after a colon (e.g. fade:0.5).")
    return kind, value


def noise_seed(image_HWC: np.ndarray) -> int:
    return int(np.sum(np.asarray(image_HWC, np.float64))) % _PRIME


def noise_draws(kind: str, shape: tuple[int, int, int], seed: int) -> dict[str, np.ndarray]:
    """Every random draw of one noise type, in a fixed order (float32): uniform `u`, `u2`; standard normal `n`;
    uniform displacement fields `dx`, `dy` in [-1, 1] (H, W) for the shuffle."""
    rng = np.random.default_rng(seed)
    if kind == "fade":
        return {"u": rng.random(shape, np.float32)}
    if kind == "dissolve":
        return {"u": rng.random(shape, np.float32), "u2": rng.random(shape, np.float32)}
    if kind == "gaussian":
        return {"n": rng.standard_normal(shape, np.float32)}
    if kind == "shuffle":
        field = shape[:2]
        return {"dx": rng.random(field, np.float32) * 2 - 1, "dy": rng.random(field, np.float32) * 2 - 1,
                "n": rng.standard_normal(shape, np.float32)}
    raise AssertionError(kind)


def gaussian_blur(field_HW: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur, kernel int(8 sigma + 1) made odd, reflect padding (torchvision's convention)."""
    size = int(8 * sigma + 1)
    size += 1 - size % 2
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    pad = size // 2
    out = np.pad(np.asarray(field_HW, np.float64), pad, mode="reflect")
    out = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="valid"), 0, out)
    out = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="valid"), 1, out)
    return out.astype(np.float32)


def elastic_warp(image_HWC: np.ndarray, dx: np.ndarray, dy: np.ndarray, alpha: float, sigma: float) -> np.ndarray:
    """Each output pixel samples the image (bilinear, zero outside) at its centre moved by alpha/2 * G_sigma * d
    pixels, d the uniform fields (torchvision's ElasticTransform: alpha/size in grid units of 2/size)."""
    h, w = image_HWC.shape[:2]
    if sigma > 0:
        dx, dy = gaussian_blur(dx, sigma), gaussian_blur(dy, sigma)
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    x = xs + alpha / 2 * dx
    y = ys + alpha / 2 * dy
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    out = np.zeros(image_HWC.shape, np.float64)
    for oy, ox, weight in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)),
                           (1, 1, fy * fx)):
        yy, xx = y0 + oy, x0 + ox
        inside = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w))[..., None]
        out += weight * inside * image_HWC[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]
    return out.astype(np.float32)


def apply_noise(kind: str, image_HWC: np.ndarray, strength: float, draws: dict[str, np.ndarray]) -> np.ndarray:
    """The noised image in [0, 1] for an image in [0, 1] and the draws of `noise_draws`."""
    img, s = np.asarray(image_HWC, np.float32), np.float32(strength)
    if kind == "fade":
        out = (1 - s) * img + s * draws["u"]
    elif kind == "dissolve":
        mask = (draws["u"] < s).astype(np.float32)
        out = img * (1 - mask) + draws["u2"] * mask
    elif kind == "gaussian":
        out = img + s * draws["n"]
    elif kind == "shuffle":
        warped = elastic_warp(img, draws["dx"], draws["dy"], _ALPHA, _SIGMA * (1 - float(s)))
        flipped = warped[::-1, ::-1]
        g = np.float32(0.75) * s * draws["n"]
        out = flipped * (1 - g) + g
    else:
        raise AssertionError(kind)
    return np.clip(out, 0, 1).astype(np.float32)


def negative_noise_image(kind: str, strength: float, source_HWC: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]: `source` (default black 224x224) with the noise of `kind` at `strength`."""
    image = (np.zeros((DEFAULT_SIZE, DEFAULT_SIZE, 3), np.float32) if source_HWC is None
             else np.asarray(source_HWC, np.float32))
    return apply_noise(kind, image, strength, noise_draws(kind, image.shape, noise_seed(image)))

"""Image I/O and the pre/post-processing diffusers' `VaeImageProcessor` applies (channels-last numpy)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from ipadapter_jax.errors import UserError


def load_image(image: str | os.PathLike | Image.Image | np.ndarray, *, what: str = "image") -> Image.Image:
    """A PIL RGB image from a path, a PIL image or a uint8/float HWC array; clear errors for bad files."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        array = image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; check the path.")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{what} {path} is not a readable image ({e}); use a PNG, JPEG or WebP file.") from None


def check_size(height: int, width: int, multiple: int) -> None:
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise UserError(f"height and width must be positive multiples of {multiple} for this model "
                        f"(got {height}x{width}); for example {height - height % multiple or multiple}x"
                        f"{width - width % multiple or multiple}.")


def _resized(image: Image.Image, height: int, width: int) -> Image.Image:
    return image if image.size == (width, height) else image.resize((width, height), resample=Image.LANCZOS)


def vae_input(image, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float32 in [-1, 1], resized with Lanczos when the size differs (diffusers' default)."""
    pixels = np.asarray(_resized(load_image(image), height, width), np.float32) / 255.0
    return pixels * 2.0 - 1.0


def control_input(image, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]: a ControlNet's conditioning image as diffusers' control image processor makes
    it (RGB, Lanczos-resized to the output size when it differs, not normalised)."""
    return np.asarray(_resized(load_image(image, what="control image"), height, width), np.float32) / 255.0


def binary_mask(mask, height: int, width: int) -> np.ndarray:
    """(H, W) float32 of 0/1: grayscale, Lanczos-resized, thresholded at 0.5 (white = 1 = repaint)."""
    if isinstance(mask, np.ndarray) and mask.ndim == 2:
        image = Image.fromarray((np.clip(mask, 0, 1) * 255).round().astype(np.uint8) if mask.dtype != np.uint8
                                else mask)
    else:
        image = load_image(mask, what="mask")
    gray = np.asarray(_resized(image.convert("L"), height, width), np.float32) / 255.0
    return (gray >= 0.5).astype(np.float32)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Decoder output (about [-1, 1]) -> uint8, as diffusers' postprocess rounds it."""
    return (np.clip(np.asarray(pixels, np.float32) / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)


def to_pil(pixels: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(a) for a in to_uint8(pixels)]


def grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """A contact sheet of equally sized images."""
    if not images:
        raise ValueError("no images to tile")
    columns = columns or int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / columns))
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        sheet.paste(im.resize((w, h)) if im.size != (w, h) else im, ((i % columns) * w, (i // columns) * h))
    return sheet


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def save_image(image: Image.Image, path: str | os.PathLike, *, text: dict[str, str] | None = None) -> None:
    """Write atomically in the format the suffix names (PNG, JPEG, WebP), so an interrupted run never leaves a
    truncated file behind. `text`: PNG text chunks (e.g. what wrote the file)."""
    path = Path(path)
    kind = IMAGE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{path} must end in {', '.join(IMAGE_FORMATS)}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    options: dict = {"quality": 95} if kind in ("JPEG", "WEBP") else {}
    if text and kind == "PNG":
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
        options["pnginfo"] = info
    try:
        image.save(tmp, format=kind, **options)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def png_text(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks of a PNG ({} for anything else or an unreadable file)."""
    try:
        with Image.open(path) as im:
            return dict(getattr(im, "text", {}) or {})
    except (OSError, UnidentifiedImageError, ValueError):
        return {}

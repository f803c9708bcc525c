"""CLIP image preprocessing in PIL and numpy, the same numbers as transformers' PIL `CLIPImageProcessor`.

transformers' image processors import torch when it is installed (several seconds); generation needs only these
few steps: convert to RGB (transparency composited on white), resize the shorter side (PIL, bicubic by default),
centre crop (zero padding where the image is smaller), rescale by 1/255 (in float64, then float32) and normalise.
A `preprocessor_config.json` asking for anything else is read by transformers' own processor instead.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from ipadapter_jax.errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_BICUBIC = 3
_UNDERSTOOD = {"do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
               "do_normalize", "image_mean", "image_std", "do_convert_rgb", "image_processor_type",
               "feature_extractor_type", "processor_class", "default_to_square"}


class ClipPixels:
    """`processor(images=[...], return_tensors="np")["pixel_values"]`: (N, 3, H, W) float32."""

    def __init__(self, *, shortest_edge: int = 224, crop: tuple[int, int] = (224, 224), resample: int = _BICUBIC,
                 do_resize: bool = True, do_center_crop: bool = True, do_rescale: bool = True,
                 rescale_factor: float = 1 / 255, do_normalize: bool = True, mean=CLIP_MEAN, std=CLIP_STD,
                 do_convert_rgb: bool = True):
        self.shortest_edge, self.crop, self.resample = shortest_edge, crop, resample
        self.do_resize, self.do_center_crop, self.do_rescale = do_resize, do_center_crop, do_rescale
        self.rescale_factor, self.do_normalize, self.do_convert_rgb = rescale_factor, do_normalize, do_convert_rgb
        self.mean, self.std = tuple(mean), tuple(std)

    @classmethod
    def from_config(cls, config: dict) -> ClipPixels | None:
        """From a `preprocessor_config.json`, or None when it asks for what only transformers does."""
        if set(config) - _UNDERSTOOD or config.get("default_to_square"):
            return None
        size, crop = config.get("size", 224), config.get("crop_size", 224)
        if isinstance(size, dict):
            if set(size) != {"shortest_edge"}:
                return None
            size = size["shortest_edge"]
        if isinstance(crop, dict):
            if set(crop) != {"height", "width"}:
                return None
            crop = (crop["height"], crop["width"])
        elif isinstance(crop, int):
            crop = (crop, crop)
        if not isinstance(size, int) or not all(isinstance(c, int) for c in crop):
            return None
        keys = ("do_resize", "resample", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize",
                "do_convert_rgb")
        given = {k: config[k] for k in keys if k in config}
        return cls(shortest_edge=size, crop=crop, mean=config.get("image_mean", CLIP_MEAN),
                   std=config.get("image_std", CLIP_STD), **given)

    def __call__(self, images, return_tensors: str = "np") -> dict[str, np.ndarray]:
        del return_tensors  # numpy only
        images = images if isinstance(images, (list, tuple)) else [images]
        return {"pixel_values": np.stack([self.one(image) for image in images])}

    def one(self, image) -> np.ndarray:
        """(3, H, W) float32 for a PIL image or an (H, W[, C]) uint8 array."""
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        if self.do_convert_rgb:
            pil = _rgb(pil)
        if self.do_resize:
            w, h = pil.size
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.shortest_edge * long / short)
            new_h, new_w = (new_long, self.shortest_edge) if w <= h else (self.shortest_edge, new_long)
            pil = pil.resize((new_w, new_h), resample=self.resample)
        array = np.array(pil)
        array = array[..., None] if array.ndim == 2 else array
        chw = np.moveaxis(array, -1, 0)
        if self.do_center_crop:
            chw = _center_crop(chw, *self.crop)
        if self.do_rescale:
            chw = (chw.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            chw = chw if np.issubdtype(chw.dtype, np.floating) else chw.astype(np.float32)
            mean, std = np.array(self.mean, chw.dtype), np.array(self.std, chw.dtype)
            chw = ((chw.T - mean) / std).T
        return chw.astype(np.float32)


def _rgb(image: Image.Image) -> Image.Image:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _center_crop(chw: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = chw.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0 and top + height <= h and left + width <= w:
        return chw[..., top:top + height, left:left + width]
    new_h, new_w = max(height, h), max(width, w)
    padded = np.zeros_like(chw, shape=(*chw.shape[:-2], new_h, new_w))
    pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded[..., pad_top:pad_top + h, pad_left:pad_left + w] = chw
    top, left = top + pad_top, left + pad_left
    return padded[..., max(0, top):min(new_h, top + height), max(0, left):min(new_w, left + width)]


def clip_pixels(image_encoder_path: str | Path | None = None, image_size: int = 224):
    """The encoder folder's `preprocessor_config.json` if any, else CLIP's defaults at `image_size`; a config
    this module does not cover goes to transformers' PIL processor."""
    config_path = None if image_encoder_path is None else Path(image_encoder_path) / "preprocessor_config.json"
    if config_path is None or not config_path.is_file():
        return ClipPixels(shortest_edge=image_size, crop=(image_size, image_size))
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"Cannot read {config_path} ({e}); fix or remove it.") from None
    ours = ClipPixels.from_config(config) if isinstance(config, dict) else None
    if ours is not None:
        return ours
    from ipadapter_jax.data.transforms import clip_image_processor

    return clip_image_processor(str(image_encoder_path), image_size)

"""Per-record training transforms, faithful to the official ``tutorial_train*.py`` recipe.

Everything here is module-level and picklable so Grain worker processes can run it: tokenizers and the
CLIP image processor are loaded lazily from their folders in each process and never pickled.

One record ``{"image": bytes | uint8 HWC, "text": str | bytes[, "face_embed"]}`` becomes (shapes per sample):

- ``pixel_values`` float32 (R, R, 3) in [-1, 1]: shortest side resized to R with PIL bilinear
  (torchvision ``Resize`` on a PIL image), then cropped to R x R.
- ``clip_pixel_values`` float32 (3, S, S): ``CLIPImageProcessor``'s numbers on the RGB image (when
  ``clip_input``), computed by ``data/clip_pixels.py`` without importing transformers' image processors (and
  torch with them: about 5 s of every training run's start).
- ``input_ids`` int32 (L,) and, with a second tokenizer (SDXL), ``input_ids_2`` int32 (L2,): the caption
  padded/truncated to the tokenizer's ``model_max_length``. Dropped captions are still tokenized as-is.
- ``time_ids`` float32 (6,) = (orig_h, orig_w, crop_top, crop_left, R, R) (when ``time_ids``; SDXL).
- ``drop_image``, ``drop_text`` bool (): the classifier-free-guidance drops; the train step substitutes
  the empty-prompt embedding and a zero image condition.
- ``face_embed`` float32 (512,) when the record has one; ``record_index`` int32 ().
"""

from __future__ import annotations

import dataclasses
import io
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from ipadapter_jax.data.clip_pixels import clip_pixels
from ipadapter_jax.data.sources import (
    IMAGE_DECODE_ERRORS,
    SKIP_EMPTY_CAPTION,
    SKIP_UNREADABLE_IMAGE,
    SkipRecord,
    check_face_embedding,
)
from ipadapter_jax.errors import ConfigError

# "center": torchvision CenterCrop (tutorial_train.py); "center_floor": (size - R) // 2 and "random":
# uniform offsets, the two modes of tutorial_train_sdxl.py.
CROP_MODES = ("center", "center_floor", "random")
_MAX_TOKENS = 1024  # tokenizers without a real model_max_length report ~1e30


@dataclasses.dataclass(frozen=True)
class TransformConfig:
    """What the per-record transform produces. Defaults are the official SD1.5 recipe."""

    tokenizer_path: str
    resolution: int = 512
    crop: str = "center"
    time_ids: bool = False
    tokenizer_2_path: str | None = None
    clip_input: bool = True  # False for FaceID (no image encoder)
    image_encoder_path: str | None = None  # its preprocessor_config.json, if any, sets CLIP preprocessing
    clip_image_size: int = 224  # default CLIP preprocessing size when no preprocessor_config.json
    p_drop_image: float = 0.05
    p_drop_text: float = 0.05
    p_drop_both: float = 0.05

    def __post_init__(self):
        if self.resolution < 1 or self.clip_image_size < 1:
            raise ConfigError(f"resolution and clip_image_size must be positive, got {self.resolution}, "
                              f"{self.clip_image_size}.")
        if self.crop not in CROP_MODES:
            raise ConfigError(f"crop {self.crop!r} is not one of {CROP_MODES}.")
        probs = (self.p_drop_image, self.p_drop_text, self.p_drop_both)
        if any(not 0.0 <= p <= 1.0 for p in probs) or sum(probs) > 1.0:
            raise ConfigError(f"Drop probabilities {probs} must each lie in [0, 1] and sum to at most 1.")


def sample_rng(seed: int, epoch: int, record_index: int) -> np.random.Generator:
    """The per-sample generator: the same (seed, epoch, record) always draws the same drops and crop."""
    return np.random.default_rng([seed, epoch, record_index])


def drop_flags(r: float, p_image: float, p_text: float, p_both: float) -> tuple[bool, bool]:
    """(drop_image, drop_text) from one uniform draw, mutually exclusive as in the official script."""
    if r < p_image:
        return True, False
    if r < p_image + p_text:
        return False, True
    if r < p_image + p_text + p_both:
        return True, True
    return False, False


def as_text(value) -> str:
    """A caption from a TFDS Text feature (bytes), a numpy scalar or a str."""
    if isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def decode_image(value) -> Image.Image:
    """A loaded PIL image from encoded bytes or a uint8 HWC/HW array; SkipRecord if it cannot be read."""
    try:
        if isinstance(value, np.ndarray) and value.dtype != np.object_:
            if value.dtype != np.uint8 or value.ndim not in (2, 3) or value.size == 0:
                raise SkipRecord(SKIP_UNREADABLE_IMAGE)
            return Image.fromarray(value[..., 0] if value.ndim == 3 and value.shape[-1] == 1 else value)
        if isinstance(value, np.ndarray):
            value = value.item()
        image = Image.open(io.BytesIO(value))
        image.load()
    except IMAGE_DECODE_ERRORS + (TypeError,):
        raise SkipRecord(SKIP_UNREADABLE_IMAGE) from None
    if image.width == 0 or image.height == 0:
        raise SkipRecord(SKIP_UNREADABLE_IMAGE)
    return image


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """torchvision ``Resize(size)`` on a PIL image: short side to ``size``, long truncated, PIL bilinear."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), Image.BILINEAR)


def crop_offsets(height: int, width: int, size: int, mode: str, rng: np.random.Generator | None = None):
    """(top, left) of the ``size`` x ``size`` crop of a (height, width) image in one of ``CROP_MODES``."""
    if mode == "center":  # torchvision CenterCrop
        return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    if mode == "center_floor":
        return (height - size) // 2, (width - size) // 2
    return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))


def to_signed_unit(image: Image.Image) -> np.ndarray:
    """``ToTensor`` then ``Normalize([0.5], [0.5])``, kept HWC: uint8 -> float32 in [-1, 1]."""
    x = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    return (x - np.float32(0.5)) / np.float32(0.5)


def vae_input(image_rgb: Image.Image, resolution: int, crop: str, rng: np.random.Generator | None = None):
    """(pixels float32 (R, R, 3), (top, left)) for an RGB image."""
    resized = resize_shorter_side(image_rgb, resolution)
    top, left = crop_offsets(resized.height, resized.width, resolution, crop, rng)
    cropped = resized.crop((left, top, left + resolution, top + resolution))
    return to_signed_unit(cropped), (top, left)


def clip_image_processor(image_encoder_path: str | None = None, image_size: int = 224):
    """The PIL ``CLIPImageProcessor`` per ``preprocessor_config.json`` if any, else default at ``image_size``.

    The PIL backend is what the official scripts ran; naming it also avoids transformers' warning about
    falling back from the torchvision backend.
    """
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # transformers 4.x: CLIPImageProcessor is the PIL/numpy implementation
        from transformers import CLIPImageProcessor as processor_class
    if image_encoder_path is not None and (Path(image_encoder_path) / "preprocessor_config.json").is_file():
        try:
            return processor_class.from_pretrained(image_encoder_path)
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"Cannot read {image_encoder_path}/preprocessor_config.json ({e}); "
                              "fix or remove it.") from None
    crop = {"height": image_size, "width": image_size}
    return processor_class(size={"shortest_edge": image_size}, crop_size=crop)


def load_tokenizer(path: str):
    """The CLIP tokenizer in folder `path` (vocab.json, merges.txt, configs) with a clear error: our `tokenizers`-built
    copy of transformers' `CLIPTokenizer` (`data/clip_tokenizer.py`: no transformers import), or
    `CLIPTokenizer.from_pretrained(path)` for folders it does not cover."""
    from ipadapter_jax.data.clip_tokenizer import ClipTokenizer

    if not Path(path).is_dir():
        raise ConfigError(f"CLIP tokenizer folder {path} does not exist; the base model folder is incomplete.")
    try:
        tokenizer = ClipTokenizer.from_folder(path)
        if tokenizer is None:
            from transformers import CLIPTokenizer

            tokenizer = CLIPTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"Cannot load a CLIP tokenizer from {path} ({e}); "
                          "pass the model's tokenizer folder.") from None
    if not 0 < tokenizer.model_max_length <= _MAX_TOKENS:
        raise ConfigError(f"Tokenizer at {path} has model_max_length {tokenizer.model_max_length}; "
                          "set it (77 for Stable Diffusion) in its tokenizer_config.json.")
    return tokenizer


class TrainTransform:
    """Record -> training example (module docstring). Picklable; loads its tokenizers and processor lazily."""

    def __init__(self, config: TransformConfig, seed: int):
        if seed < 0:
            raise ConfigError(f"seed must be non-negative, got {seed}.")
        self.config = config
        self.seed = seed
        self._loaded = None
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"config": self.config, "seed": self.seed}

    def __setstate__(self, state):
        self.__init__(state["config"], state["seed"])

    def load(self):
        """Load the tokenizer(s) and CLIP processor now (in the main process, to fail fast: ConfigError)."""
        if self._loaded is not None:
            return self._loaded
        with self._lock:
            if self._loaded is None:
                c = self.config
                self._loaded = (
                    load_tokenizer(c.tokenizer_path),
                    load_tokenizer(c.tokenizer_2_path) if c.tokenizer_2_path else None,
                    clip_pixels(c.image_encoder_path, c.clip_image_size) if c.clip_input else None,
                )
        return self._loaded

    def _tokenize(self, tokenizer, text: str) -> np.ndarray:
        # Fast tokenizers are not safe to call from several threads at once (Grain maps in threads).
        with self._lock:
            ids = tokenizer(text, max_length=tokenizer.model_max_length, padding="max_length",
                            truncation=True, return_tensors="np").input_ids
        return ids[0].astype(np.int32)

    def __call__(self, record: dict, record_index: int, epoch: int) -> dict:
        """One training example; raises SkipRecord for an unreadable image or an empty caption."""
        c = self.config
        text = as_text(record["text"])
        if not text.strip():
            raise SkipRecord(SKIP_EMPTY_CAPTION)
        raw = decode_image(record["image"])
        tokenizer, tokenizer_2, processor = self.load()
        rng = sample_rng(self.seed, epoch, record_index)
        drop_image, drop_text = drop_flags(rng.random(), c.p_drop_image, c.p_drop_text, c.p_drop_both)
        rgb = raw if raw.mode == "RGB" else raw.convert("RGB")
        pixels, (top, left) = vae_input(rgb, c.resolution, c.crop, rng)
        out = {
            "pixel_values": pixels,
            "input_ids": self._tokenize(tokenizer, text),
            "drop_image": np.bool_(drop_image),
            "drop_text": np.bool_(drop_text),
            "record_index": np.int32(record_index),
        }
        if tokenizer_2 is not None:
            out["input_ids_2"] = self._tokenize(tokenizer_2, text)
        if processor is not None:
            out["clip_pixel_values"] = processor(images=rgb, return_tensors="np")["pixel_values"][0]
        if c.time_ids:
            h, w = raw.height, raw.width
            out["time_ids"] = np.array([h, w, top, left, c.resolution, c.resolution], np.float32)
        if "face_embed" in record:
            out["face_embed"] = check_face_embedding(record["face_embed"])
        return out

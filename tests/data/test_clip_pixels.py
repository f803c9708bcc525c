"""Our numpy CLIP preprocessing gives transformers' PIL CLIPImageProcessor's numbers exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ipadapter_jax.data.clip_pixels import ClipPixels, clip_pixels


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (300, 257, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (40, 50, 4), dtype=np.uint8), "RGBA"),
            Image.fromarray(rng.integers(0, 256, (64, 31), dtype=np.uint8), "L"),
            rng.integers(0, 256, (20, 90, 3), dtype=np.uint8)]


@pytest.mark.parametrize("size,crop", [(224, (224, 224)), (32, (32, 24)), (30, (64, 64))])  # the last one pads
def test_same_pixels_as_transformers(size, crop):
    from transformers import CLIPImageProcessorPil

    reference = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": crop[0], "width": crop[1]})
    ours = ClipPixels(shortest_edge=size, crop=crop)
    for image in _images():
        expected = reference(images=[image], return_tensors="np")["pixel_values"]
        got = ours(images=[image], return_tensors="np")["pixel_values"]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)


def test_encoder_folder_config_and_fallback(tmp_path):
    from transformers import CLIPImageProcessorPil

    config = {"crop_size": 40, "size": 48, "do_center_crop": True, "do_normalize": True, "do_resize": True,
              "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 2,
              "image_processor_type": "CLIPImageProcessor"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    ours = clip_pixels(tmp_path)
    assert isinstance(ours, ClipPixels)
    image = _images()[0]
    np.testing.assert_array_equal(ours(images=[image])["pixel_values"],
                                  CLIPImageProcessorPil.from_pretrained(tmp_path)(images=[image],
                                                                                  return_tensors="np")["pixel_values"])
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**config, "crop_pct": 0.9}))
    assert not isinstance(clip_pixels(tmp_path), ClipPixels)  # what we do not cover goes to transformers

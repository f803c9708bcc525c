"""The per-record transform against independent computations of the official recipe."""

import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from ipadapter_jax.data import transforms
from ipadapter_jax.data.sources import SKIP_EMPTY_CAPTION, SKIP_UNREADABLE_IMAGE, SkipRecord
from ipadapter_jax.errors import ConfigError


def _noise_image(width, height, seed=0, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (height, width) if channels is None else (height, width, channels)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode=mode)


def _png_bytes(image):
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _config(tokenizer_dir, **kw):
    return transforms.TransformConfig(tokenizer_path=str(tokenizer_dir), **kw)


# (width, height, resolution) -> resized (w, h) and crop (top, left) for torchvision's rounding and for
# tutorial_train_sdxl.py's floor, worked out by hand: 16 * 44 / 30 = 23.47 -> 23 wide, excess 7,
# round(3.5) = 4 (round half to even) but 7 // 2 = 3; 16 * 45 / 30 = 24 -> excess 8 -> 4 either way.
CASES = [
    ((44, 30, 16), (23, 16), (0, 4), (0, 3)),
    ((30, 44, 16), (16, 23), (4, 0), (3, 0)),
    ((45, 30, 16), (24, 16), (0, 4), (0, 4)),
    ((42, 30, 16), (22, 16), (0, 3), (0, 3)),  # excess 6
    ((16, 16, 16), (16, 16), (0, 0), (0, 0)),  # already the size: no resampling
    ((9, 12, 16), (16, 21), (2, 0), (2, 0)),  # upscaling, excess 5: round(2.5) = 2
]


@pytest.mark.parametrize(("wh_r", "resized", "center", "floor"), CASES)
def test_vae_input_matches_resize_crop_normalize(wh_r, resized, center, floor):
    w, h, r = wh_r
    image = _noise_image(w, h)
    reference_resized = np.asarray(image.resize(resized, Image.BILINEAR) if resized != (w, h) else image)
    for mode, (top, left) in (("center", center), ("center_floor", floor)):
        pixels, offsets = transforms.vae_input(image, r, mode)
        assert offsets == (top, left)
        assert pixels.dtype == np.float32 and pixels.shape == (r, r, 3)
        expected = reference_resized[top:top + r, left:left + r].astype(np.float64) / 127.5 - 1.0
        np.testing.assert_allclose(pixels, expected, rtol=0, atol=1e-6)
    assert transforms.vae_input(_noise_image(w, h, 1), r, "center")[0].min() >= -1.0


def test_random_crop_stays_inside_and_follows_the_rng():
    image = _noise_image(60, 20)
    offsets = {transforms.vae_input(image, 16, "random", np.random.default_rng(s))[1] for s in range(40)}
    assert all(top == 0 and 0 <= left <= 32 for top, left in offsets) and len(offsets) > 5
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    np.testing.assert_array_equal(transforms.vae_input(image, 16, "random", rng_a)[0],
                                  transforms.vae_input(image, 16, "random", rng_b)[0])


def test_clip_input_equals_clip_image_processor():
    from transformers import CLIPImageProcessor

    image = _noise_image(300, 257, seed=2)
    ours = transforms.clip_image_processor()
    assert type(ours).__name__ == "CLIPImageProcessorPil"  # no torchvision-fallback warning path
    expected = CLIPImageProcessor()(images=image, return_tensors="np")["pixel_values"][0]
    got = ours(images=image, return_tensors="np")["pixel_values"][0]
    assert got.dtype == np.float32 and got.shape == (3, 224, 224)
    np.testing.assert_array_equal(got, expected)


def test_clip_preprocessing_from_an_image_encoder_folder(tmp_path):
    config = {"crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 32}, "do_center_crop": True,
              "do_normalize": True, "do_resize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
              "resample": 3, "image_processor_type": "CLIPImageProcessor"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    got = transforms.clip_image_processor(str(tmp_path))(images=_noise_image(40, 50), return_tensors="np")
    assert got["pixel_values"].shape == (1, 3, 32, 32)
    assert got["pixel_values"].min() >= -1.0 and got["pixel_values"].max() <= 1.0
    size_only = transforms.clip_image_processor(str(tmp_path / "missing"), 48)
    assert size_only(images=_noise_image(40, 50), return_tensors="np")["pixel_values"].shape == (1, 3, 48, 48)


def test_train_transform_output_contract(tokenizer_dir):
    from transformers import CLIPTokenizer

    config = _config(tokenizer_dir, resolution=16, clip_image_size=24, crop="center_floor", time_ids=True,
                     tokenizer_2_path=str(tokenizer_dir))
    transform = transforms.TrainTransform(config, seed=7)
    raw = _noise_image(44, 30, mode="RGBA")
    record = {"image": _png_bytes(raw), "text": "a red circle", "face_embed": np.ones((1, 512), np.float64)}
    out = transform(record, record_index=5, epoch=2)

    assert {k: (v.dtype, v.shape) for k, v in out.items()} == {
        "pixel_values": (np.float32, (16, 16, 3)),
        "clip_pixel_values": (np.float32, (3, 24, 24)),
        "input_ids": (np.int32, (77,)),
        "input_ids_2": (np.int32, (77,)),
        "time_ids": (np.float32, (6,)),
        "drop_image": (np.bool_, ()),
        "drop_text": (np.bool_, ()),
        "face_embed": (np.float32, (512,)),
        "record_index": (np.int32, ()),
    }
    rgb = raw.convert("RGB")
    np.testing.assert_array_equal(out["pixel_values"], transforms.vae_input(rgb, 16, "center_floor")[0])
    np.testing.assert_array_equal(out["time_ids"], [30, 44, 0, 3, 16, 16])
    from transformers import CLIPImageProcessorPil  # the numbers data/clip_pixels.py computes without it

    reference = CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    expected_clip = reference(images=rgb, return_tensors="np")["pixel_values"][0]
    np.testing.assert_array_equal(out["clip_pixel_values"], expected_clip)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    expected_ids = tokenizer("a red circle", padding="max_length", max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(out["input_ids"], expected_ids)
    r = transforms.sample_rng(7, 2, 5).random()
    assert (bool(out["drop_image"]), bool(out["drop_text"])) == transforms.drop_flags(r, 0.05, 0.05, 0.05)

    long = transform({"image": _png_bytes(rgb), "text": "word " * 200}, 0, 0)
    assert long["input_ids"].shape == (77,) and long["input_ids"][-1] == tokenizer.eos_token_id
    faceless = transforms.TrainTransform(_config(tokenizer_dir, resolution=16, clip_input=False), 0)
    assert set(faceless({"image": np.asarray(rgb), "text": "x"}, 0, 0)) == {
        "pixel_values", "input_ids", "drop_image", "drop_text", "record_index"}


def test_train_transform_skips_broken_records(tokenizer_dir):
    transform = transforms.TrainTransform(_config(tokenizer_dir, resolution=8, clip_input=False), 0)
    good = _png_bytes(_noise_image(10, 10))
    for record, reason in [
        ({"image": good[:30], "text": "truncated"}, SKIP_UNREADABLE_IMAGE),
        ({"image": b"not an image", "text": "junk"}, SKIP_UNREADABLE_IMAGE),
        ({"image": np.zeros((4, 4, 3), np.float32), "text": "float pixels"}, SKIP_UNREADABLE_IMAGE),
        ({"image": good, "text": " \n"}, SKIP_EMPTY_CAPTION),
    ]:
        with pytest.raises(SkipRecord) as info:
            transform(record, 0, 0)
        assert info.value.reason == reason
    grey = transform({"image": np.full((10, 12, 1), 255, np.uint8), "text": "grey"}, 0, 0)
    np.testing.assert_array_equal(grey["pixel_values"], np.ones((8, 8, 3), np.float32))


def test_drop_flags_are_exclusive_in_official_order():
    assert transforms.drop_flags(0.02, 0.05, 0.05, 0.05) == (True, False)
    assert transforms.drop_flags(0.07, 0.05, 0.05, 0.05) == (False, True)
    assert transforms.drop_flags(0.12, 0.05, 0.05, 0.05) == (True, True)
    assert transforms.drop_flags(0.16, 0.05, 0.05, 0.05) == (False, False)


def test_drop_fractions_and_reproducibility():
    n = 20000

    def flags(seed, epoch):
        draws = [transforms.sample_rng(seed, epoch, i).random() for i in range(n)]
        return np.array([transforms.drop_flags(r, 0.05, 0.05, 0.05) for r in draws])

    a = flags(0, 0)
    image_only = (a[:, 0] & ~a[:, 1]).mean()
    text_only = (~a[:, 0] & a[:, 1]).mean()
    both = (a[:, 0] & a[:, 1]).mean()
    for fraction in (image_only, text_only, both):  # 3 sigma of a binomial(20000, 0.05) is 0.0046
        assert abs(fraction - 0.05) < 0.0046
    np.testing.assert_array_equal(a, flags(0, 0))
    assert (a != flags(0, 1)).any(axis=1).mean() > 0.1  # another epoch draws anew
    assert (a != flags(1, 0)).any(axis=1).mean() > 0.1


def test_transform_pickles_without_loaded_tokenizers(tokenizer_dir):
    transform = transforms.TrainTransform(_config(tokenizer_dir, resolution=8, clip_image_size=8), 3)
    record = {"image": _png_bytes(_noise_image(12, 9)), "text": "a thing"}
    before = transform(record, 4, 1)
    blob = pickle.dumps(transform)
    assert len(blob) < 2000  # no tokenizer or processor inside
    after = pickle.loads(blob)(record, 4, 1)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])


def test_config_validation(tokenizer_dir, tmp_path):
    with pytest.raises(ConfigError, match="crop"):
        _config(tokenizer_dir, crop="middle")
    with pytest.raises(ConfigError, match="sum to at most 1"):
        _config(tokenizer_dir, p_drop_image=0.5, p_drop_text=0.4, p_drop_both=0.2)
    with pytest.raises(ConfigError, match="CLIP tokenizer"):
        transforms.TrainTransform(transforms.TransformConfig(tokenizer_path=str(tmp_path / "none")), 0).load()

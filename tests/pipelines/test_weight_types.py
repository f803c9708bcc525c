"""Weight types, layer weights, embeds-scaling tables, combine modes, negative noise and tiles on the host,
against the definitions written again in tests/controls_reference.py (no models: fast)."""

from __future__ import annotations

import numpy as np
import pytest
from controls_reference import (
    SD15_STYLE,
    block_of,
    reference_tiles,
    reference_weights,
    torch_noise,
)
from PIL import Image

from ipadapter_jax.errors import UserError
from ipadapter_jax.models.unet_config import STANDARD_BASES, UNetConfig
from ipadapter_jax.pipelines.image_prompt import ImagePrompt, combine_features, layer_scales
from ipadapter_jax.pipelines.layer_controls import embeds_scaled, prompt_layers
from ipadapter_jax.pipelines.negative_noise import (
    apply_noise,
    negative_noise_image,
    noise_draws,
    noise_seed,
    parse_negative_noise,
)
from ipadapter_jax.pipelines.tiles import tile_layout, tile_reference
from ipadapter_jax.pipelines.weight_types import WEIGHT_TYPES, attention_blocks, block_weights, weight_type_name
from ipadapter_jax.tiny_models import TINY_UNET, TINY_UNET_FULL_LAYOUT, TINY_UNET_XL_FULL_LAYOUT

CONFIGS = {"sd15": STANDARD_BASES["sd15"], "sd2": STANDARD_BASES["sd2"], "sdxl": STANDARD_BASES["sdxl"],
           "tiny-sd15": UNetConfig.from_dict(TINY_UNET_FULL_LAYOUT),
           "tiny-sdxl": UNetConfig.from_dict(TINY_UNET_XL_FULL_LAYOUT)}
BASE = {"sd15": "sd15", "sd2": "sd15", "sdxl": "sdxl", "tiny-sd15": "sd15", "tiny-sdxl": "sdxl"}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_block_index_is_the_references_numbering(name):
    config = CONFIGS[name]
    blocks = attention_blocks(config)
    expected = [block_of(layer.path, BASE[name]) for layer in config.cross_attention_layers()]
    assert blocks.base == BASE[name] and blocks.index.tolist() == expected
    if name == "sdxl":  # one SDXL block holds 2 or 10 transformer layers, all with the block's weight
        assert np.bincount(blocks.index).tolist() == [2, 2, 10, 10, 10, 10, 10, 10, 2, 2, 2]


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("kind", WEIGHT_TYPES)
def test_weight_tables_match_the_reference(name, kind):
    config, base = CONFIGS[name], BASE[name]
    wc = 0.35 if kind in ("style and composition", "strong style and composition", "style transfer precise",
                          "composition precise") else None
    weights, swap = block_weights(kind, 0.8, config, composition_weight=wc)
    table, swapped = reference_weights(kind, base, 0.8, wc)
    t = [block_of(layer.path, base) for layer in config.cross_attention_layers()]
    np.testing.assert_allclose(weights, [table.get(i, 0.0) for i in t], rtol=1e-6, atol=0)
    np.testing.assert_array_equal(swap, [float(i in swapped) for i in t])


def test_names_take_spaces_hyphens_or_underscores_and_unknown_ones_list_the_accepted():
    assert weight_type_name("ease_in_out") == weight_type_name("Ease-In-Out") == "ease in-out"
    assert weight_type_name("style-transfer_precise") == "style transfer precise"
    with pytest.raises(UserError, match="weight type 'stlye transfer' is unknown; use one of: linear, ") as err:
        ImagePrompt(weight_type="stlye transfer")
    assert all(name in str(err.value) for name in WEIGHT_TYPES) and str(err.value).count(". ") == 0
    with pytest.raises(UserError, match="embeds scaling 'k' is unknown; use one of v, kv, kv-penalty"):
        ImagePrompt(embeds_scaling="k")


def test_style_types_equal_the_instantstyle_presets_in_diffusers_dict_form():
    style = {"up": {"block_0": [0.0, 1.0, 0.0]}}
    layout = {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}
    for config in (CONFIGS["sdxl"], CONFIGS["tiny-sdxl"]):
        np.testing.assert_array_equal(block_weights("style transfer", 1.0, config)[0], layer_scales(style, config))
        np.testing.assert_array_equal(block_weights("style and composition", 1.0, config)[0],
                                      layer_scales(layout, config))
        np.testing.assert_array_equal(layer_scales("style", config), layer_scales(style, config))
        np.testing.assert_array_equal(layer_scales("style_and_layout", config), layer_scales(layout, config))
        np.testing.assert_array_equal(prompt_layers(ImagePrompt(weight_type="style transfer", scale=0.6),
                                                    config).scale, layer_scales(style, config) * np.float32(0.6))
    # one definition: the presets now also mean the SD1.5 table
    sd15 = CONFIGS["sd15"]
    t = np.asarray([block_of(layer.path, "sd15") for layer in sd15.cross_attention_layers()])
    np.testing.assert_array_equal(layer_scales("style", sd15), np.isin(t, SD15_STYLE).astype(np.float32))
    with pytest.raises(UserError, match="SDXL-shaped"):
        layer_scales("style", UNetConfig.from_dict(TINY_UNET))


def test_layer_weights_replace_the_table_and_are_range_checked():
    config = CONFIGS["sdxl"]
    t = np.asarray([block_of(layer.path, "sdxl") for layer in config.cross_attention_layers()])
    weights, swap = block_weights("linear", 0.5, config, layer_weights="0:1.0, 6:0.4")
    np.testing.assert_allclose(weights, np.select([t == 0, t == 6], [0.5, 0.2], 0.0), rtol=1e-6)
    assert not swap.any()
    _, swap = block_weights("composition precise", 0.5, config, layer_weights="6:1")  # the swap stays
    np.testing.assert_array_equal(swap, (t != 3).astype(np.float32))
    with pytest.raises(UserError, match="layer weights name block 11, but this UNet's attention blocks are numbered "
                                        "0 to 10"):
        block_weights("linear", 1.0, config, layer_weights="3:1,11:0.5")
    with pytest.raises(UserError, match="block:weight pairs such as '0:1.0,6:0.5'"):
        ImagePrompt(layer_weights="3=1")
    tiny = UNetConfig.from_dict(TINY_UNET)  # layer weights and scalar types work on any layout
    assert block_weights("ease out", 1.0, tiny)[0].shape == (tiny.num_ip_layers,)
    assert block_weights("linear", 1.0, tiny, layer_weights="3:1")[0].max() == 1.0


def test_composition_settings_are_checked():
    sd15 = CONFIGS["sd15"]
    prompt = ImagePrompt(weight_type="style and composition", composition_images=[np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(UserError, match=r"^a composition image works on SDXL-shaped UNets only \(its composition "
                                        r"block\); drop composition_images \(--composition-image\) for this UNet\.$"):
        prompt_layers(prompt, sd15)
    np.testing.assert_array_equal(prompt_layers(prompt, CONFIGS["sdxl"]).use_alt,
                                  [float(block_of(layer.path, "sdxl") == 3)
                                   for layer in CONFIGS["sdxl"].cross_attention_layers()])
    with pytest.raises(UserError, match="a composition image needs weight type 'style and composition' or"):
        ImagePrompt(weight_type="style transfer", composition_images=["x.png"])
    with pytest.raises(UserError, match="composition_weight applies to the weight types"):
        ImagePrompt(weight_type="ease in", composition_weight=0.5)
    with pytest.raises(UserError, match="is defined for SD1.5- and SDXL-shaped UNets"):
        block_weights("composition", 1.0, UNetConfig.from_dict(TINY_UNET))
    with pytest.raises(UserError, match="pass a float scale"):
        prompt_layers(ImagePrompt(weight_type="ease in", scale={"mid": 1.0}), sd15)


@pytest.mark.parametrize("mode", ["v", "kv", "kv-penalty", "kv-mean-penalty"])
def test_embeds_scaling_tables(mode):
    w = np.asarray([0.0, 0.5, 1.2, 2.0], np.float32)
    c = np.asarray([320, 640, 1280, 1280], np.float32)
    scale, key, shift = embeds_scaled(mode, w, c)
    penalized = w * c / 1280
    expected = {"v": (w, 1, 0), "kv": (w, w, 0), "kv-penalty": (penalized, penalized, 0),
                "kv-mean-penalty": (w != 0, penalized, penalized - 1)}[mode]
    for got, want in zip((scale, key, shift), expected, strict=True):
        np.testing.assert_allclose(got, np.broadcast_to(np.asarray(want, np.float32), w.shape), rtol=1e-7)
    if mode == "v":  # today's scales, untouched
        assert scale is w or np.array_equal(scale, w)


def test_combine_modes_against_torch(torch):
    rng = np.random.default_rng(0)
    for shape in ((3, 24), (3, 5, 16)):
        x = rng.standard_normal(shape).astype(np.float32)
        e = torch.from_numpy(x)
        expected = {"average": e.mean(0, keepdim=True), "add": e.sum(0, keepdim=True),
                    "subtract": e[:1] - e[1:].mean(0, keepdim=True), "max": e.max(0, keepdim=True).values,
                    "min": e.min(0, keepdim=True).values,
                    # the norm over the batch (image) dimension, per feature; not over the features
                    "norm_average": (e / torch.norm(e, dim=0, keepdim=True)).mean(0, keepdim=True)}
        for mode, want in expected.items():
            np.testing.assert_allclose(combine_features(x, mode), want.numpy(), rtol=1e-6, atol=1e-7, err_msg=mode)
    zero_column = np.asarray([[1.0, 0.0], [3.0, 0.0]], np.float32)
    np.testing.assert_allclose(combine_features(zero_column, "norm_average"), [[4 / np.sqrt(10) / 2, 0.0]])


@pytest.mark.parametrize("kind", ["fade", "dissolve", "gaussian", "shuffle"])
@pytest.mark.parametrize("strength", [0.3, 1.0])
def test_negative_noise_matches_the_definition(torch, kind, strength):
    rng = np.random.default_rng(1)
    image = rng.random((40, 56, 3)).astype(np.float32)
    seed = noise_seed(image)
    assert seed == int(np.sum(image, dtype=np.float64)) % 1_000_000_007
    draws = noise_draws(kind, image.shape, seed)
    ours = apply_noise(kind, image, strength, draws)
    expected = torch_noise(torch, kind, image, strength, draws)
    assert ours.shape == image.shape and ours.min() >= 0 and ours.max() <= 1
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(negative_noise_image(kind, strength, image), ours)  # deterministic per image


def test_negative_noise_defaults_and_parsing():
    black = negative_noise_image("fade", 1.0)
    assert black.shape == (224, 224, 3)
    u = noise_draws("fade", (224, 224, 3), 0)["u"]  # a black image sums to 0: seed 0
    np.testing.assert_array_equal(black, u)
    assert parse_negative_noise("Shuffle") == ("shuffle", 1.0) and parse_negative_noise("fade:0.25") == ("fade", 0.25)
    for bad in ("blur", "fade:2", "fade:x"):
        with pytest.raises(UserError, match="use one of fade, dissolve, gaussian, shuffle"):
            ImagePrompt(negative_noise=bad)
    prompt = ImagePrompt(negative_noise="gaussian:0.5")
    assert np.asarray(prompt.unconditional_images()[0]).shape == (224, 224, 3)
    assert ImagePrompt().unconditional_images() is None


@pytest.mark.parametrize("size", [(300, 290), (1000, 300), (256, 700), (3000, 400), (200, 180)])
def test_tile_layout_matches_the_definition(size):
    width, height = size
    layout = tile_layout(width, height)
    if max(size) <= 256 and 0.75 <= width / height <= 1.33:
        assert layout is None  # already a single tile
        return
    _, resized, masks = layout
    want_size, corners = reference_tiles(width, height)
    assert resized == want_size
    assert [(m.box[1], m.box[0]) for m in masks] == corners
    assert all(m.box[2:] == (256, 256) and m.frame == want_size[::-1] for m in masks)
    assert all(m.box[0] + 256 <= want_size[1] and m.box[1] + 256 <= want_size[0] for m in masks)


def test_tiles_become_masked_image_prompts():
    image = Image.fromarray((np.random.default_rng(2).random((120, 400, 3)) * 255).astype(np.uint8))
    prompt = ImagePrompt(images=[image], tiles="auto", scale=0.7)
    tiles, masks = tile_reference(image)
    assert len(prompt.images) == len(prompt.masks) == len(tiles) == 4
    for got, want in zip(prompt.images, tiles, strict=True):
        np.testing.assert_array_equal(got, want)
    assert prompt.masks[0].array()[:, :256].all() and not prompt.masks[0].array()[:, 256:].any()
    again = ImagePrompt(**{**prompt.__dict__})  # tiles are made once
    assert len(again.images) == 4
    with pytest.raises(UserError, match="tiles split one reference image; give exactly one, not 2"):
        ImagePrompt(images=[image, image], tiles="auto")
    with pytest.raises(UserError, match="do not go with masks"):
        ImagePrompt(images=[image], tiles="auto", masks=[np.ones((4, 4))])

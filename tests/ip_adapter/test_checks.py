"""Compatibility checks (adapter vs UNet, vs image encoder), spec defaults and JSON, preprocessing, bf16 compute."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from reference_models import SD1_UNET, official_ip_adapter, rel_err, save_official_ip_adapter

from ipadapter_jax.errors import ConfigError, UserError
from ipadapter_jax.generation.image_features import image_processor_for, pixel_values
from ipadapter_jax.ip_adapter import attach, check_image_encoder, check_unet
from ipadapter_jax.models.adapter_spec import AdapterSpec, make_spec
from ipadapter_jax.models.unet_config import STANDARD_BASES, UNetConfig
from ipadapter_jax.weights.ip_adapter_files import load_ip_adapter

VIT_H = SimpleNamespace(projection_dim=1024, hidden_size=1280)
VIT_BIGG = SimpleNamespace(projection_dim=1280, hidden_size=1664)


def test_adapter_vs_unet_message_names_both_sides_and_the_fix():
    spec = make_spec("base", "sdxl", image_feature_dim=1280, name="ip-adapter_sdxl.bin")
    with pytest.raises(UserError) as e:
        check_unet(spec, STANDARD_BASES["sd15"])
    assert str(e.value) == ("ip-adapter_sdxl.bin is an SDXL adapter (cross-attention 2048, 70 layers) and cannot "
                            "drive this SD1.5 UNet (768, 16 layers): load an SD1.5 adapter or an SDXL base.")
    check_unet(spec, STANDARD_BASES["sdxl"])
    sd2 = make_spec("base", "sd2", image_feature_dim=1024)
    with pytest.raises(UserError, match="an SD2.x adapter .* cannot drive this SD1.5 UNet"):
        check_unet(sd2, STANDARD_BASES["sd15"])


def test_adapter_vs_image_encoder_messages():
    sdxl = make_spec("base", "sdxl", image_feature_dim=1280, name="ip-adapter_sdxl")
    with pytest.raises(UserError) as e:
        check_image_encoder(sdxl, VIT_H)
    assert str(e.value) == ("ip-adapter_sdxl expects a ViT-bigG image encoder (1280-d image_embeds) but the "
                            "encoder gives 1024-d (ViT-H): use h94/IP-Adapter sdxl_models/image_encoder.")
    check_image_encoder(sdxl, VIT_BIGG)
    plus = make_spec("plus", "sd15", image_feature_dim=1280, name="ip-adapter-plus_sd15")
    with pytest.raises(UserError, match=r"expects a ViT-H image encoder \(1280-d hidden_states\[-2\]\) but the "
                                        r"encoder gives 1664-d \(ViT-bigG\): use h94/IP-Adapter models/image_encoder"):
        check_image_encoder(plus, VIT_BIGG)
    with pytest.raises(UserError, match="needs a ViT-H image encoder"):
        check_image_encoder(plus, None)
    faceid = make_spec("faceid", "sd15")
    check_image_encoder(faceid, None)  # FaceID needs no encoder ...
    assert faceid.needs_face_embeds and not faceid.needs_image_encoder
    check_image_encoder(make_spec("faceid-plus", "sd15", image_feature_dim=1280), VIT_H)  # ... Plus reads ViT-H


def test_make_spec_defaults_follow_the_official_recipes():
    plus15 = make_spec("plus", "sd15", image_feature_dim=1280)
    assert (plus15.num_tokens, plus15.resampler.dim, plus15.resampler.heads, plus15.resampler.output_dim) == (
        16, 768, 12, 768)
    plusxl = make_spec("plus", "sdxl", image_feature_dim=1280)
    assert (plusxl.resampler.dim, plusxl.resampler.heads, plusxl.resampler.output_dim) == (1280, 20, 2048)
    face = make_spec("faceid", "sdxl")
    assert (face.num_tokens, face.lora_rank, face.face_embed_dim, face.face_hidden_dim) == (4, 128, 512, 1024)
    assert make_spec("faceid-portrait", "sd15").num_tokens == 16
    assert make_spec("full", "sd15", image_feature_dim=1280).num_tokens == 257
    with pytest.raises(ConfigError, match="needs image_feature_dim"):
        make_spec("base", "sd15")


def test_spec_json_round_trip_and_validation():
    spec = make_spec("faceid-plus", UNetConfig.from_dict(SD1_UNET), image_feature_dim=40, name="x")
    again = AdapterSpec.from_json(spec.to_json())
    assert again == spec
    raw = json.loads(spec.to_json())
    with pytest.raises(ConfigError, match=r"unknown fields \['colour'\]"):
        AdapterSpec.from_dict(dict(raw, colour=1))
    with pytest.raises(ConfigError, match="variant 'turbo' is unknown"):
        AdapterSpec.from_dict(dict(raw, variant="turbo"))


def test_attach_needs_one_slot_per_adapter(tmp_path, torch):
    from reference_models import save_unet

    from ipadapter_jax.models.unet import cross_attentions
    from ipadapter_jax.weights.diffusers_models import load_unet

    ref = save_unet(tmp_path / "unet", SD1_UNET)
    state = official_ip_adapter(ref, "base")
    adapter = load_ip_adapter(save_official_ip_adapter(state, tmp_path / "a.bin"), unet_config=tmp_path / "unet")
    unet = load_unet(tmp_path / "unet", num_ip_adapters=2)
    with pytest.raises(UserError, match="built with 2 IP-Adapter slots but 1 adapters were given: load the UNet "
                                        "with num_ip_adapters=1"):
        attach(unet, [adapter])
    attach(unet, [adapter, adapter])
    layer = cross_attentions(unet)[3]  # official key 7
    np.testing.assert_array_equal(np.asarray(layer.to_v_ip[1].kernel[...]),
                                  state["ip_adapter"]["7.to_v_ip.weight"].numpy().T)


def test_image_processor_reads_the_encoder_folder(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    assert pixel_values(image_processor_for(None, 32), [image]).shape == (1, 3, 32, 32)
    assert pixel_values(image_processor_for(tmp_path, 40), [image]).shape == (1, 3, 40, 40)  # no config: default
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 48},
        "crop_size": {"height": 48, "width": 48}, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3, "rescale_factor": 1 / 255}))
    pixels = pixel_values(image_processor_for(tmp_path, 32), [image])
    assert pixels.shape == (1, 3, 48, 48) and pixels.min() >= -1.0 and pixels.max() <= 1.0


@pytest.mark.parametrize("variant", ["plus", "faceid-plus"])
def test_bfloat16_compute_under_strict_promotion(tmp_path, torch, variant):
    from diffusers import UNet2DConditionModel

    ref = UNet2DConditionModel(**SD1_UNET)
    resampler = dict(dim=48, depth=2, heads=1, embedding_dim=40)
    path = save_official_ip_adapter(official_ip_adapter(ref, variant, resampler=resampler), tmp_path / "a.bin")
    rng = np.random.default_rng(0)
    feats = jnp.asarray(rng.standard_normal((2, 9, 40)), jnp.float32)
    face = jnp.asarray(rng.standard_normal((2, 16)), jnp.float32) if variant == "faceid-plus" else None
    outs = {}
    for dtype in ("float32", "bfloat16"):
        adapter = load_ip_adapter(path, unet_config=UNetConfig.from_dict(SD1_UNET), dtype=dtype)
        outs[dtype] = adapter.tokens(feats, face, shortcut=True, shortcut_scale=jnp.float32(0.5))
    assert outs["bfloat16"].dtype == jnp.bfloat16
    assert rel_err(outs["bfloat16"].astype(jnp.float32), outs["float32"]) < 3e-2

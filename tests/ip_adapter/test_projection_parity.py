"""Every projection model vs diffusers' PyTorch class, both loaded from one random OFFICIAL-layout file
(diffusers through its own converter `_convert_ip_adapter_image_proj_to_diffusers`)."""

from __future__ import annotations

import numpy as np
import pytest
from reference_models import SD1_UNET, official_ip_adapter, rel_err, save_official_ip_adapter

from ipadapter_jax.errors import UserError
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.weights.ip_adapter_files import load_ip_adapter

RESAMPLER = dict(dim=48, depth=4, heads=2, embedding_dim=40)  # inner 128 != dim: catches a dim/inner mix-up
CASES = {
    "base": dict(image_dim=24, tokens=4),
    "plus": dict(tokens=5, resampler=RESAMPLER),
    "full": dict(image_dim=40),
    "faceid": dict(tokens=3, lora_rank=4),
    "faceid-plus": dict(tokens=4, resampler=RESAMPLER),
}
TOL = 1e-5


@pytest.fixture(scope="module")
def ref_unet(torch):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**SD1_UNET).eval()


def _inputs(variant, rng):
    feats = {"base": rng.standard_normal((3, 24)), "full": rng.standard_normal((3, 7, 40)),
             "plus": rng.standard_normal((3, 9, 40)), "faceid-plus": rng.standard_normal((3, 9, 40))}
    face = rng.standard_normal((3, 16)) if variant.startswith("faceid") else None
    f = feats.get(variant)
    return (None if f is None else f.astype(np.float32)), (None if face is None else face.astype(np.float32))


@pytest.mark.parametrize("variant", sorted(CASES))
def test_projection_matches_diffusers(tmp_path, torch, ref_unet, variant):
    state = official_ip_adapter(ref_unet, variant, seed=3, **CASES[variant])
    path = save_official_ip_adapter(state, tmp_path / "adapter.bin")
    ours = load_ip_adapter(path, unet_config=UNetConfig.from_dict(SD1_UNET))
    assert ours.spec.variant == variant
    ref = ref_unet._convert_ip_adapter_image_proj_to_diffusers(state["image_proj"], low_cpu_mem_usage=False).eval()
    features, face = _inputs(variant, np.random.default_rng(0))
    if face is not None:
        with pytest.raises(UserError, match="needs face embeddings"):
            ours.tokens(features)
    shortcuts = [(False, 1.0), (True, 0.7)] if variant == "faceid-plus" else [(False, 1.0)]
    for shortcut, scale in shortcuts:
        with torch.no_grad():
            if variant == "faceid-plus":
                ref.clip_embeds = torch.tensor(features)[:, None]
                ref.shortcut, ref.shortcut_scale = shortcut, scale
            expected = ref(torch.tensor(face if face is not None else features)).numpy()
        got = np.asarray(ours.tokens(features, face, shortcut=shortcut, shortcut_scale=scale))
        assert got.shape == expected.shape
        err = rel_err(got, expected)
        print(f"{variant} shortcut={shortcut}: rel err {err:.2e}")
        assert err < TOL


def test_multi_image_leading_dims_project_per_image(tmp_path, torch, ref_unet):
    """(B, N_img, P) features give (B, N_img, T, C) tokens, each image projected on its own."""
    state = official_ip_adapter(ref_unet, "base", **CASES["base"])
    ours = load_ip_adapter(save_official_ip_adapter(state, tmp_path / "a.safetensors"),
                           unet_config=UNetConfig.from_dict(SD1_UNET))
    feats = np.random.default_rng(1).standard_normal((2, 3, 24)).astype(np.float32)
    tokens = np.asarray(ours.tokens(feats))
    assert tokens.shape == (2, 3, 4, SD1_UNET["cross_attention_dim"])
    np.testing.assert_allclose(tokens[1, 2], np.asarray(ours.tokens(feats[1, 2][None]))[0], rtol=1e-6, atol=1e-6)

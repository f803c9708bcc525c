"""AutoencoderKL parity with diffusers (float32, CPU) on tiny random checkpoints;
one jit compile per config."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference_models import rel_err, save_vae

from ipadapter_jax.errors import ConfigError
from ipadapter_jax.models.vae import scale_latents, unscale_latents
from ipadapter_jax.weights.diffusers_models import load_vae
from ipadapter_jax.weights.torch_layout import export_state

VAE_2BLOCK = dict(  # SD1.x-like: quant convs, mid attention, no shift
    block_out_channels=(32, 64), layers_per_block=2, latent_channels=4, norm_num_groups=8, sample_size=32,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
)
VAE_3BLOCK = dict(  # SD3-like: no quant convs, shift_factor
    block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=8, norm_num_groups=16,
    sample_size=32,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
)
CONFIGS = {"2block": VAE_2BLOCK, "3block": VAE_3BLOCK}
HEIGHT, WIDTH = 24, 32  # not square, so a swapped H/W would fail
KEY = jax.random.key(3)


def nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, pixels, latents, key):
    vae = nnx.merge(graphdef, state)
    posterior = vae.encode(pixels)
    return dict(mean=posterior.mean, logvar=posterior.logvar, sample=posterior.sample(key),
                decoded=vae.decode(latents), scaled=vae.latents_from_pixels(pixels),
                pixels=vae.pixels_from_latents(latents))


def run_ours(vae, pixels, latents) -> dict:
    graphdef, state = nnx.split(vae)
    out = _forward(graphdef, state, jnp.asarray(nhwc(pixels)), jnp.asarray(nhwc(latents)), KEY)
    return {k: np.asarray(v.astype(jnp.float32)) for k, v in out.items()}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory, torch):
    cfg = CONFIGS[request.param]
    folder = tmp_path_factory.mktemp(f"vae_{request.param}")
    ref = save_vae(folder, cfg)
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, (2, 3, HEIGHT, WIDTH)).astype(np.float32)
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    latents = rng.standard_normal((2, cfg["latent_channels"], HEIGHT // f, WIDTH // f)).astype(np.float32)
    scale, shift = ref.config.scaling_factor, ref.config.shift_factor
    with torch.no_grad():
        posterior = ref.encode(torch.tensor(pixels)).latent_dist
        z = torch.tensor(latents)
        # The pipelines' conventions: SD1/SDXL scale only, SD3/Flux also shift.
        scaled = (posterior.mode() - shift) * scale if shift is not None else scale * posterior.mode()
        unscaled = z / scale + shift if shift is not None else z / scale
        expected = dict(mean=posterior.mean, logvar=posterior.logvar, std=posterior.std,
                        decoded=ref.decode(z).sample, scaled=scaled, pixels=ref.decode(unscaled).sample)
    expected = {k: nhwc(v.numpy()) for k, v in expected.items()}
    vae = load_vae(folder)
    return dict(name=request.param, cfg=cfg, folder=folder, ref=ref, pixels=pixels, latents=latents, vae=vae,
                expected=expected, ours=run_ours(vae, pixels, latents))


def test_encode_moments_match_diffusers(case):
    ours, expected = case["ours"], case["expected"]
    assert ours["mean"].shape == expected["mean"].shape
    assert rel_err(ours["mean"], expected["mean"]) < 1e-5
    assert rel_err(ours["logvar"], expected["logvar"]) < 1e-5


def test_decode_matches_diffusers(case):
    ours, expected = case["ours"], case["expected"]
    assert ours["decoded"].shape == (2, HEIGHT, WIDTH, 3)
    assert rel_err(ours["decoded"], expected["decoded"]) < 1e-5


def test_posterior_sample_uses_diffusers_std(case):
    ours, expected = case["ours"], case["expected"]
    noise = np.asarray(jax.random.normal(KEY, ours["mean"].shape, jnp.float32))
    assert rel_err(ours["sample"], expected["mean"] + expected["std"] * noise) < 1e-5


def test_latent_scaling_follows_pipeline_convention(case):
    ours, expected = case["ours"], case["expected"]
    assert case["vae"].vae_scale_factor == 2 ** (len(case["cfg"]["block_out_channels"]) - 1)
    assert rel_err(ours["scaled"], expected["scaled"]) < 1e-5
    assert rel_err(ours["pixels"], expected["pixels"]) < 1e-5


def test_export_state_round_trips_to_torch_keys(case):
    exported = export_state(case["vae"])
    reference = {k: v.numpy() for k, v in case["ref"].state_dict().items()}
    assert exported.keys() == reference.keys()
    assert all(np.array_equal(exported[k], reference[k]) for k in reference)


@pytest.mark.parametrize("variant", [dict(mid_block_add_attention=False),
                                     dict(block_out_channels=(16,), down_block_types=("DownEncoderBlock2D",),
                                          up_block_types=("UpDecoderBlock2D",), use_post_quant_conv=False)])
def test_architecture_variants_load_every_key(tmp_path, torch, variant):
    """No mid-block attention, or a single block: the same keys as diffusers, each consumed exactly once."""
    ref = save_vae(tmp_path, dict(VAE_2BLOCK, **variant))
    exported = export_state(load_vae(tmp_path))
    assert exported.keys() == ref.state_dict().keys()
    assert not any(".attentions." in k for k in exported) or variant.get("mid_block_add_attention", True)


def test_deprecated_attention_names_load(case, tmp_path):
    """Old checkpoints name the mid-block attention query/key/value/proj_attn, some as 1x1 conv weights."""
    from safetensors.torch import save_file

    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in case["ref"].state_dict().items():
        for new, legacy in old.items():
            marker = f".attentions.0.{new}."
            if marker in key:
                key = key.replace(marker, f".attentions.0.{legacy}.")
                if key.startswith("encoder.") and key.endswith("weight"):
                    value = value[:, :, None, None]  # conv form
        state[key] = value.contiguous()
    assert any(".query." in k for k in state) and any(v.ndim == 4 and ".key." in k for k, v in state.items())
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((case["folder"] / "config.json").read_text())
    ours = run_ours(load_vae(tmp_path), case["pixels"], case["latents"])
    assert rel_err(ours["mean"], case["expected"]["mean"]) < 1e-5
    assert rel_err(ours["decoded"], case["expected"]["decoded"]) < 1e-5


def test_bfloat16_is_close_to_float32(tmp_path, torch):
    """A bf16 sanity check, not parity: the bfloat16 load runs and lands near the float32 reference."""
    ref = save_vae(tmp_path, VAE_2BLOCK)
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, (2, 3, HEIGHT, WIDTH)).astype(np.float32)
    latents = rng.standard_normal((2, 4, HEIGHT // 2, WIDTH // 2)).astype(np.float32)
    with torch.no_grad():
        mean = nhwc(ref.encode(torch.tensor(pixels)).latent_dist.mean.numpy())
        decoded = nhwc(ref.decode(torch.tensor(latents)).sample.numpy())
    vae = load_vae(tmp_path, dtype="bfloat16")
    assert vae.encoder.conv_in.kernel.dtype == jnp.bfloat16
    ours = run_ours(vae, pixels, latents)
    assert rel_err(ours["mean"], mean) < 2e-2
    assert rel_err(ours["decoded"], decoded) < 2e-2


@pytest.mark.parametrize("field, value", [("down_block_types", ["AttnDownEncoderBlock2D"]),
                                          ("up_block_types", ["UpBlock2D"]), ("act_fn", "gelu"),
                                          ("_class_name", "AutoencoderTiny")])
def test_unsupported_config_names_the_field(tmp_path, field, value):
    config = dict(_class_name="AutoencoderKL", block_out_channels=[32], norm_num_groups=8,
                  down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"])
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=field):
        load_vae(tmp_path)


def test_sdxl_style_latent_statistics():
    """With latents_mean/latents_std set, the SDXL pipelines scale per channel."""
    rng = np.random.default_rng(1)
    z = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    mean, std, scale = (0.1, -0.2, 0.3, 0.05), (0.9, 1.1, 1.3, 0.7), 0.5
    m, s = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    stats = dict(scaling_factor=scale, latents_mean=mean, latents_std=std)
    np.testing.assert_allclose(scale_latents(jnp.asarray(z), **stats), (z - m) * scale / s, rtol=1e-6)
    np.testing.assert_allclose(unscale_latents(jnp.asarray(z), **stats), z * s / scale + m, rtol=1e-6)

"""ControlNet parity with diffusers (float32, CPU) on tiny random checkpoints: the residuals, their scaling
(scalar, per batch row, guess mode, global pooling, BGR input) and the UNet that adds them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference_models import SD1_UNET, SD2_UNET, SDXL_UNET, controlnet_config, rel_err, save_controlnet, save_unet

from ipadapter_jax.weights.controlnet import load_controlnet
from ipadapter_jax.weights.diffusers_models import load_unet

CONFIGS = {"sd1": SD1_UNET, "sd2": SD2_UNET, "sdxl": SDXL_UNET}
TOL = 1e-5


def _inputs(cfg, seed=0, batch=2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 4, 16, 16)).astype(np.float32)
    cond = rng.uniform(0, 1, (batch, 3, 32, 32)).astype(np.float32)
    ctx = rng.standard_normal((batch, 7, cfg["cross_attention_dim"])).astype(np.float32)
    t = np.array([10, 700][:batch])
    added = {}
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        added = {"text_embeds": rng.standard_normal((batch, pooled)).astype(np.float32),
                 "time_ids": np.tile(np.array([[64, 48, 0, 8, 64, 64]], np.float32), (batch, 1))}
    return x, t, ctx, cond, added


def _torch_controlnet(ref, x, t, ctx, cond, added, scale, guess_mode=False):
    import torch

    with torch.no_grad():
        down, mid = ref(torch.tensor(x), torch.tensor(t), torch.tensor(ctx), torch.tensor(cond),
                        conditioning_scale=scale, guess_mode=guess_mode,
                        added_cond_kwargs={k: torch.tensor(v) for k, v in added.items()} or None, return_dict=False)
    return [d.numpy() for d in down], mid.numpy()


def _nhwc(a):
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def _nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def _ours(controlnet, x, t, ctx, cond, added, scale, guess_mode=False):
    graphdef, state = nnx.split(controlnet)

    @jax.jit
    def forward(state, x, t, ctx, cond, added, scale):
        return nnx.merge(graphdef, state)(x, t, ctx, cond, scale, guess_mode=guess_mode, **added)

    down, mid = forward(state, _nhwc(x), jnp.asarray(t), jnp.asarray(ctx), _nhwc(cond),
                        {k: jnp.asarray(v) for k, v in added.items()}, jnp.asarray(scale, jnp.float32))
    return [_nchw(d) for d in down], _nchw(mid)


def _assert_residuals_match(ours, expected):
    (down, mid), (ref_down, ref_mid) = ours, expected
    assert len(down) == len(ref_down)
    errors = [rel_err(a, b) for a, b in zip(down, ref_down, strict=True)] + [rel_err(mid, ref_mid)]
    assert max(errors) < TOL, f"relative error per residual: {errors}"
    return errors


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_controlnet_residuals_match_diffusers(tmp_path, torch, name):
    cfg = CONFIGS[name]
    ref = save_controlnet(tmp_path, controlnet_config(cfg))
    x, t, ctx, cond, added = _inputs(cfg)
    ours = _ours(load_controlnet(tmp_path), x, t, ctx, cond, added, 0.7)
    errors = _assert_residuals_match(ours, _torch_controlnet(ref, x, t, ctx, cond, added, 0.7))
    print(f"{name}: max residual rel err {max(errors):.2e}")


def test_guess_mode_per_row_scale_and_bgr_match_diffusers(tmp_path, torch):
    """A per-row scale is what one diffusers call per row with its own float scale gives."""
    cfg = SD1_UNET
    ref = save_controlnet(tmp_path, controlnet_config(cfg, controlnet_conditioning_channel_order="bgr"))
    x, t, ctx, cond, added = _inputs(cfg, seed=3)
    scales = np.array([0.4, 1.3], np.float32)
    rows = [_torch_controlnet(ref, x[i:i + 1], t[i:i + 1], ctx[i:i + 1], cond[i:i + 1], added, float(scales[i]),
                              guess_mode=True) for i in range(2)]
    expected = ([np.concatenate(parts) for parts in zip(*(r[0] for r in rows), strict=True)],
                np.concatenate([r[1] for r in rows]))
    controlnet = load_controlnet(tmp_path)
    _assert_residuals_match(_ours(controlnet, x, t, ctx, cond, added, scales, guess_mode=True), expected)
    # The channel flip and the guess-mode ramp really act.
    plain_down, _ = _ours(controlnet, x, t, ctx, cond, added, scales)
    assert rel_err(plain_down[0], expected[0][0]) > 0.5
    rgb_down, _ = _ours(controlnet, x, t, ctx, cond[:, ::-1], added, scales, guess_mode=True)
    assert rel_err(rgb_down[0], expected[0][0]) > 1e-2


def test_global_pool_conditions_match_diffusers(tmp_path, torch):
    cfg = SD1_UNET
    ref = save_controlnet(tmp_path, controlnet_config(cfg, global_pool_conditions=True))
    x, t, ctx, cond, added = _inputs(cfg, seed=4)
    expected = _torch_controlnet(ref, x, t, ctx, cond, added, 0.8, guess_mode=True)
    down, mid = _ours(load_controlnet(tmp_path), x, t, ctx, cond, added, 0.8, guess_mode=True)
    assert mid.shape[2:] == (1, 1)
    _assert_residuals_match((down, mid), expected)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_unet_with_controlnet_residuals_matches_diffusers(tmp_path, torch, name):
    """ControlNet -> UNet: the residuals are added where diffusers adds them (skips after the down path, and
    the mid block's output)."""
    cfg = CONFIGS[name]
    ref_unet = save_unet(tmp_path / "unet", cfg, seed=1)
    ref_cn = save_controlnet(tmp_path / "controlnet", controlnet_config(cfg), seed=2)
    x, t, ctx, cond, added = _inputs(cfg, seed=5)
    down, mid = _torch_controlnet(ref_cn, x, t, ctx, cond, added, 0.9)
    with torch.no_grad():
        expected = ref_unet(torch.tensor(x), torch.tensor(t), torch.tensor(ctx),
                            added_cond_kwargs={k: torch.tensor(v) for k, v in added.items()} or None,
                            down_block_additional_residuals=tuple(torch.tensor(d) for d in down),
                            mid_block_additional_residual=torch.tensor(mid)).sample.numpy()
        plain = ref_unet(torch.tensor(x), torch.tensor(t), torch.tensor(ctx),
                         added_cond_kwargs={k: torch.tensor(v) for k, v in added.items()} or None).sample.numpy()
    assert rel_err(expected, plain) > 1e-2  # the residuals matter

    unet, controlnet = load_unet(tmp_path / "unet"), load_controlnet(tmp_path / "controlnet")
    unet_def, unet_state = nnx.split(unet)
    cn_def, cn_state = nnx.split(controlnet)

    @jax.jit
    def forward(unet_state, cn_state, x, t, ctx, cond, added):
        down, mid = nnx.merge(cn_def, cn_state)(x, t, ctx, cond, jnp.float32(0.9), **added)
        return nnx.merge(unet_def, unet_state)(x, t, ctx, down_block_additional_residuals=down,
                                               mid_block_additional_residual=mid, **added)

    got = forward(unet_state, cn_state, _nhwc(x), jnp.asarray(t), jnp.asarray(ctx), _nhwc(cond),
                  {k: jnp.asarray(v) for k, v in added.items()})
    err = rel_err(_nchw(got), expected)
    print(f"{name}: UNet + ControlNet rel err {err:.2e}")
    assert err < TOL


def test_unet_residual_arguments_are_checked(tmp_path, torch):
    save_unet(tmp_path, SD1_UNET)
    unet = load_unet(tmp_path)
    x, t, ctx, _, _ = _inputs(SD1_UNET, batch=1)
    args = (_nhwc(x), jnp.asarray(t), jnp.asarray(ctx))
    with pytest.raises(ValueError, match="both"):
        unet(*args, mid_block_additional_residual=jnp.zeros((1, 8, 8, 64)))
    with pytest.raises(ValueError, match="skip tensors"):
        unet(*args, down_block_additional_residuals=(jnp.zeros((1, 16, 16, 32)),),
             mid_block_additional_residual=jnp.zeros((1, 8, 8, 64)))

"""The other adapter variants and options run end to end: SDXL (two text encoders, pooled embedding, time ids)
with a Plus (Resampler) adapter, remat, clipping, min-SNR, noise offset and a cosine schedule; full-face
specs; and the per-record draws behind noise offset."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from training.helpers import make_config

from ipadapter_jax.sharding import MeshConfig, make_mesh
from ipadapter_jax.tiny_models import write_tiny_pipeline
from ipadapter_jax.training import loss as loss_lib
from ipadapter_jax.training.config import ModelConfig
from ipadapter_jax.training.loop import train
from ipadapter_jax.training.model import build_model
from ipadapter_jax.weights.ip_adapter_files import load_ip_adapter


def test_sdxl_plus_with_every_option(tiny_inputs, tmp_path):
    base = write_tiny_pipeline(tmp_path / "sdxl", kind="sdxl")
    config = make_config(
        {**tiny_inputs, "base": base}, tmp_path / "run", "total_steps=2", "global_batch_size=8",
        "model.variant=plus", "model.num_tokens=4", "model.resampler_heads=1",
        "model.resampler_depth=1", "model.remat=dots_no_batch", "optimizer.grad_clip_norm=1.0",
        "optimizer.schedule=cosine", "optimizer.warmup_steps=1", "loss.min_snr_gamma=5", "loss.noise_offset=0.05",
        "checkpoint.every_steps=1")
    result = train(config, devices=jax.devices()[:1])
    assert result.step == 2 and np.isfinite(result.losses).all()
    assert [m["learning_rate"] for m in result.history] == pytest.approx([0.0, 1e-3])
    adapter = load_ip_adapter(result.exported, unet_config=base / "unet")
    assert adapter.spec.variant == "plus" and adapter.spec.cross_attention_dim == 64
    assert adapter.spec.resampler.depth == 1 and adapter.spec.resampler.embedding_dim == 32


def test_full_face_spec(tiny_inputs):
    mesh = make_mesh(MeshConfig(data=1, fsdp=1), jax.devices()[:1])
    model = ModelConfig(base=str(tiny_inputs["base"]), image_encoder=str(tiny_inputs["encoder"]),
                        variant="full")
    assembled = build_model(model, mesh, (("(.*)", "replicated"),), with_encoders=False, seed=0)
    assert assembled.spec.num_tokens == 17  # CLS + 4x4 patches of the 32 px encoder
    assert {"image_proj/proj/0/kernel", "image_proj/proj/3/scale"} <= set(assembled.trainable)


def test_draws_are_per_record_and_noise_offset_is_per_channel():
    settings = loss_lib.LossSettings("epsilon", 1000, (("scaling_factor", 1.0),))
    offset = loss_lib.LossSettings("epsilon", 1000, (("scaling_factor", 1.0),), noise_offset=0.1)
    key = jax.random.key(0)
    a = loss_lib.draws(key, jnp.asarray([3, 9]), (4, 4, 2), settings)
    b = loss_lib.draws(key, jnp.asarray([9, 5]), (4, 4, 2), settings)
    np.testing.assert_array_equal(a.noise[1], b.noise[0])  # record 9 draws the same wherever it is
    assert int(a.timesteps[1]) == int(b.timesteps[0])
    assert not np.array_equal(a.noise[0], b.noise[1])
    c = loss_lib.draws(key, jnp.asarray([3, 9]), (4, 4, 2), offset)
    shift = np.asarray(c.noise - a.noise)
    assert np.abs(shift).max() > 0
    np.testing.assert_allclose(shift, np.broadcast_to(shift[:, :1, :1], shift.shape), atol=1e-6)


def test_timestep_range_bounds_the_draws_and_rejects_bad_ranges():
    from ipadapter_jax.errors import ConfigError
    from ipadapter_jax.training.config import LossConfig

    scaling = (("scaling_factor", 1.0),)
    assert loss_lib.loss_settings(LossConfig(), "epsilon", 1000, scaling).timesteps is None
    assert loss_lib.loss_settings(LossConfig(max_timestep=1000), "epsilon", 1000, scaling).timesteps is None
    settings = loss_lib.loss_settings(LossConfig(min_timestep=600, max_timestep=900), "epsilon", 1000, scaling)
    assert settings.timesteps == (600, 900)
    t = np.asarray(loss_lib.draws(jax.random.key(1), jnp.arange(4096), (2, 2, 1), settings).timesteps)
    assert t.min() == 600 and t.max() == 899  # uniform over [600, 900): 4096 draws reach both ends
    full = np.asarray(loss_lib.draws(jax.random.key(1), jnp.arange(4096), (2, 2, 1),
                                     loss_lib.loss_settings(LossConfig(), "epsilon", 1000, scaling)).timesteps)
    assert full.min() < 100 and full.max() > 900
    with pytest.raises(ConfigError, match="min_timestep"):
        LossConfig(min_timestep=500, max_timestep=400)
    with pytest.raises(ConfigError, match="1000 training timesteps"):
        loss_lib.loss_settings(LossConfig(max_timestep=1200), "epsilon", 1000, scaling)
    with pytest.raises(ConfigError, match="1000 training timesteps"):
        loss_lib.loss_settings(LossConfig(min_timestep=1000), "epsilon", 1000, scaling)

"""Noise schedules and training targets against diffusers' `DDPMScheduler` and `compute_snr`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_models import rel_err

from ipadapter_jax.errors import ConfigError
from ipadapter_jax.schedulers import (
    alphas_cumprod_for_config,
    betas_for_config,
    ddpm_add_noise,
    snr,
    training_target,
    velocity,
)

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
training_utils = pytest.importorskip("diffusers.training_utils")

SD15 = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}
CONFIGS = {
    "sd15-scaled-linear": SD15,
    "linear": {"beta_schedule": "linear"},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "short-linear": {"num_train_timesteps": 333, "beta_start": 0.001, "beta_end": 0.03},
    "trained": {"num_train_timesteps": 5, "trained_betas": [0.1, 0.2, 0.3, 0.4, 0.5]},
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_schedule_is_diffusers_bit_for_bit(config):
    ref = diffusers.DDPMScheduler.from_config(config)
    np.testing.assert_array_equal(betas_for_config(config), ref.betas.numpy())
    np.testing.assert_array_equal(alphas_cumprod_for_config(config), ref.alphas_cumprod.numpy())


def test_zero_terminal_snr_schedule():
    config = {**SD15, "rescale_betas_zero_snr": True}
    ref = diffusers.DDPMScheduler.from_config(config)
    ours = alphas_cumprod_for_config(config)
    assert ours[-1] == 0.0
    # The rescaling takes sqrt of the whole table and squares it back; torch's vectorised sqrt rounds
    # differently on different CPUs (a few ulps per value), numpy's is correctly rounded.
    assert rel_err(ours, ref.alphas_cumprod.numpy()) < 1e-6


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    x0, noise = (rng.standard_normal((6, 4, 8, 8), dtype=np.float32) for _ in range(2))
    return x0, noise, np.array([0, 1, 250, 500, 998, 999])


def test_add_noise_velocity_and_snr_match_diffusers(batch):
    x0, noise, t = batch
    ref = diffusers.DDPMScheduler.from_config(SD15)
    ac = jnp.asarray(alphas_cumprod_for_config(SD15))
    tx, tn, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
    got_noisy = jax.jit(ddpm_add_noise)(ac, x0, noise, jnp.asarray(t, jnp.int32))
    got_v = jax.jit(velocity)(ac, x0, noise, jnp.asarray(t, jnp.int32))
    # a*x + b*n with torch's sqrt of the schedule (CPU-dependent rounding) and XLA's fused multiply-add: a few
    # float32 ulps per element.
    assert rel_err(got_noisy, ref.add_noise(tx, tn, tt).numpy()) < 1e-6
    assert rel_err(got_v, ref.get_velocity(tx, tn, tt).numpy()) < 1e-6
    # compute_snr goes through two torch sqrt calls (CPU-dependent rounding); ours divides directly.
    assert rel_err(snr(ac, jnp.asarray(t)), training_utils.compute_snr(ref, tt).numpy()) < 1e-6


def test_training_target(batch):
    x0, noise, t = batch
    ac = jnp.asarray(alphas_cumprod_for_config(SD15))
    assert training_target("epsilon", ac, x0, noise, t) is noise
    np.testing.assert_array_equal(
        training_target("v_prediction", ac, x0, noise, t), velocity(ac, x0, noise, t)
    )
    with pytest.raises(ConfigError, match="prediction_type"):
        training_target("sample", ac, x0, noise, t)

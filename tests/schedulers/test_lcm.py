"""LCM specifics against diffusers' `LCMScheduler`: the distillation schedule for any `original_inference_steps`,
the boundary-condition scalings, and clear errors (trajectories are in test_parity.py)."""

import numpy as np
import pytest

from ipadapter_jax.errors import ConfigError
from ipadapter_jax.schedulers import LCM, make_scheduler
from ipadapter_jax.schedulers.lcm import boundary_scalings

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

SD15 = {  # runwayml/stable-diffusion-v1-5 scheduler_config.json, as LCM-LoRA users pass it to LCMScheduler
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False,
}  # fmt: skip


@pytest.mark.parametrize(("original", "steps"), [(50, 1), (50, 4), (50, 7), (50, 50), (8, 8), (8, 3), (100, 9),
                                                 (1000, 33), (3, 2)])
def test_timesteps_follow_the_original_schedule_exactly(original, steps):
    config = {**SD15, "original_inference_steps": original}
    plan = make_scheduler("lcm", config).plan(steps)
    ref = diffusers.LCMScheduler.from_config(config)
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(np.asarray(plan.timesteps), ref.timesteps.numpy())
    assert plan.needs_noise == (steps > 1)


@pytest.mark.parametrize("scaling", [10.0, 5.5, 1.0])
def test_boundary_scalings_match_diffusers(scaling):
    ref = diffusers.LCMScheduler.from_config({**SD15, "timestep_scaling": scaling})
    timesteps = np.array([999, 759, 499, 259, 19, 1, 0])
    c_skip, c_out = boundary_scalings(timesteps, scaling)
    for t, skip, out in zip(timesteps, c_skip, c_out, strict=True):
        ref_skip, ref_out = ref.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        np.testing.assert_allclose(skip, float(ref_skip), rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(out, float(ref_out), rtol=1e-6)
    assert c_skip[-1] == 1.0 and c_out[-1] == 0.0  # at t = 0 the sample is returned as it is


def test_lcm_by_class_name_and_its_own_defaults():
    sched = make_scheduler(None, {"_class_name": "LCMScheduler"})
    assert isinstance(sched, LCM)
    ref = diffusers.LCMScheduler()
    # scaled_linear from 0.00085 to 0.012, not DDPM's linear 1e-4 to 0.02
    np.testing.assert_allclose(sched.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-6)


@pytest.mark.parametrize(("overrides", "steps", "field"), [
    ({}, 51, "original_inference_steps"),
    ({"original_inference_steps": 2000}, 4, "original_inference_steps"),
    ({"thresholding": True}, 4, "thresholding"),
    ({"prediction_type": "flow"}, 4, "prediction_type"),
])  # fmt: skip
def test_bad_configs_and_step_counts_name_the_field(overrides, steps, field):
    with pytest.raises(ConfigError, match=field):
        make_scheduler("lcm", {**SD15, **overrides}).plan(steps)

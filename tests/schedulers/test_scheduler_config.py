"""Loading scheduler configs, switching samplers on one config, and clear errors for what is unsupported."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from ipadapter_jax.errors import ConfigError
from ipadapter_jax.schedulers import (
    SCHEDULERS,
    DPMSolverMultistep,
    EulerDiscrete,
    load_scheduler,
    make_scheduler,
)

SD15 = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "trained_betas": None,
}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "overrides", "field"),
    [
        ("ddim", {"thresholding": True}, "thresholding"),
        ("ddim", {"timestep_spacing": "karras"}, "timestep_spacing"),
        ("ddim", {"beta_schedule": "sigmoid"}, "beta_schedule"),
        ("ddim", {"trained_betas": [0.1, 0.2]}, "trained_betas"),
        ("pndm", {"prediction_type": "sample"}, "prediction_type"),
        ("euler", {"interpolation_type": "log_linear"}, "interpolation_type"),
        ("euler", {"timestep_type": "continuous"}, "timestep_type"),
        ("euler", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
        ("euler_ancestral", {"prediction_type": "sample"}, "prediction_type"),
        ("dpmpp_2m", {"thresholding": True}, "thresholding"),
        ("dpmpp_2m", {"final_sigmas_type": "max"}, "final_sigmas_type"),
        ("dpmpp_2m", {"variance_type": "learned_range"}, "variance_type"),
        ("dpmpp_2m", {"use_lu_lambdas": True}, "use_lu_lambdas"),
    ],
)
def test_unsupported_fields_raise_config_error_naming_the_field(name, overrides, field):
    with pytest.raises(ConfigError, match=field):
        make_scheduler(name, {**SD15, **overrides})


def test_dpm_algorithms_other_than_dpmsolverpp_are_rejected_by_class_name():
    config = {**SD15, "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}
    with pytest.raises(ConfigError, match="algorithm_type"):
        make_scheduler(None, config)


def test_unknown_class_and_name_list_what_is_supported():
    with pytest.raises(ConfigError, match="LMSDiscreteScheduler.*DDIMScheduler.*EulerDiscreteScheduler"):
        make_scheduler(None, {**SD15, "_class_name": "LMSDiscreteScheduler"})
    with pytest.raises(ConfigError, match="heun.*dpmpp_2m_karras"):
        make_scheduler("heun", SD15)


@pytest.mark.parametrize(
    ("steps", "strength", "eta", "field"),
    [(0, 1.0, 0.0, "num_inference_steps"), (1001, 1.0, 0.0, "num_inference_steps"),
     (2.5, 1.0, 0.0, "num_inference_steps"), (10, 0.0, 0.0, "strength"), (10, 0.05, 0.0, "strength"),
     (10, 1.0, 0.5, "eta")],
)  # fmt: skip
def test_bad_run_arguments_raise_config_error(steps, strength, eta, field):
    with pytest.raises(ConfigError, match=field):
        make_scheduler("euler", SD15).plan(steps, strength=strength, eta=eta)


def test_names_cover_the_brief_and_imply_their_fields():
    assert set(SCHEDULERS) == {"ddim", "pndm", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_karras",
                               "lcm"}
    karras = make_scheduler("dpmpp_2m_karras", {**SD15, "solver_order": 3})
    assert isinstance(karras, DPMSolverMultistep)
    assert karras.fields["use_karras_sigmas"] and karras.fields["solver_order"] == 2
    assert not make_scheduler("dpmpp_2m", {**SD15, "use_karras_sigmas": True}).fields["use_karras_sigmas"]


def test_load_scheduler_from_file_folder_or_model_root(tmp_path):
    (tmp_path / "scheduler").mkdir()
    path = tmp_path / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(SD15))
    for where in (path, path.parent, tmp_path):
        plan = load_scheduler(where).plan(3)
        np.testing.assert_array_equal(np.asarray(plan.timesteps), [667, 334, 334, 1])


def test_another_schedulers_config_is_a_base_with_this_samplers_defaults(tmp_path):
    """SD1.5's PNDM config has no timestep_spacing: Euler takes its own default (linspace), like diffusers."""
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(SD15))
    sched = load_scheduler(path, name="euler")
    assert isinstance(sched, EulerDiscrete) and sched.fields["timestep_spacing"] == "linspace"
    np.testing.assert_array_equal(np.asarray(sched.plan(3).timesteps), np.float32([999.0, 499.5, 0.0]))


def test_load_scheduler_errors_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match="No scheduler config"):
        load_scheduler(tmp_path)
    bad = tmp_path / "scheduler_config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        load_scheduler(tmp_path)


def test_ancestral_step_without_noise_is_an_error():
    sched = make_scheduler("euler_ancestral", SD15)
    plan = sched.plan(4)
    x = jnp.zeros((1, 4, 8, 8), jnp.float32)
    with pytest.raises(ValueError, match="noise"):
        sched.step(plan, sched.init_state(plan, x.shape, x.dtype), x, x, 0)

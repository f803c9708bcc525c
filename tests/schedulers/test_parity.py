"""Our samplers against diffusers' PyTorch schedulers: timesteps, sigmas, and whole denoising loops."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_models import rel_err

from ipadapter_jax.schedulers import make_scheduler

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
# diffusers calls np.array on torch tensors, which numpy 2 flags; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SD15 = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "trained_betas": None,
}  # fmt: skip
SDXL = {  # stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
    "trained_betas": None, "use_karras_sigmas": False,
}  # fmt: skip
TRAILING_V = {"timestep_spacing": "trailing", "prediction_type": "v_prediction", "steps_offset": 0}
ZERO_SNR = {**TRAILING_V, "rescale_betas_zero_snr": True}
DDIM, PNDM, EULER = "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler"
EULER_A, DPM = "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"
LCM = "LCMScheduler"

# id -> (our name, diffusers class, config overrides on top of SD1.5's, eta)
CASES = {
    "ddim-sd15": ("ddim", DDIM, {}, 0.0),
    "ddim-trailing-alpha1-clip": (
        "ddim", DDIM, {"timestep_spacing": "trailing", "set_alpha_to_one": True, "clip_sample": True}, 0.0,
    ),
    "ddim-linspace-v-clip1.5": (
        "ddim", DDIM,
        {"timestep_spacing": "linspace", "prediction_type": "v_prediction", "clip_sample": True,
         "clip_sample_range": 1.5}, 0.0,
    ),
    "ddim-sample-pred": ("ddim", DDIM, {"prediction_type": "sample", "set_alpha_to_one": True}, 0.0),
    "ddim-zero-snr": ("ddim", DDIM, ZERO_SNR, 0.0),
    "ddim-eta": ("ddim", DDIM, {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}, 0.7),
    "pndm-sd15": ("pndm", PNDM, {}, 0.0),
    "pndm-prk": ("pndm", PNDM, {"skip_prk_steps": False}, 0.0),
    "pndm-trailing-v": ("pndm", PNDM, TRAILING_V, 0.0),
    "pndm-ignores-zero-snr": ("pndm", PNDM, {"rescale_betas_zero_snr": True}, 0.0),  # not a PNDM field
    "pndm-linspace-cosine": (
        "pndm", PNDM, {"timestep_spacing": "linspace", "beta_schedule": "squaredcos_cap_v2"}, 0.0,
    ),
    "euler-sdxl": ("euler", EULER, SDXL, 0.0),
    "euler-sd15-linspace": ("euler", EULER, {}, 0.0),
    "euler-trailing-v": ("euler", EULER, TRAILING_V, 0.0),
    "euler-karras-sigma-min": (
        "euler", EULER, {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, 0.0,
    ),
    "euler-sdxl-karras": ("euler", EULER, {**SDXL, "use_karras_sigmas": True}, 0.0),
    "euler-zero-snr": ("euler", EULER, ZERO_SNR, 0.0),
    "euler-a-sd15": ("euler_ancestral", EULER_A, {}, 0.0),
    "euler-a-sdxl": ("euler_ancestral", EULER_A, SDXL, 0.0),
    "euler-a-trailing-v": ("euler_ancestral", EULER_A, TRAILING_V, 0.0),
    "dpmpp-2m": ("dpmpp_2m", DPM, {}, 0.0),
    "dpmpp-2m-karras": ("dpmpp_2m_karras", DPM, {}, 0.0),
    "dpmpp-2m-karras-leading": ("dpmpp_2m_karras", DPM, {"timestep_spacing": "leading"}, 0.0),
    "dpmpp-2m-trailing-v": ("dpmpp_2m", DPM, TRAILING_V, 0.0),
    "dpmpp-2m-sigma-min-full-order": (
        "dpmpp_2m", DPM, {"final_sigmas_type": "sigma_min", "lower_order_final": False}, 0.0,
    ),
    "dpmpp-2m-euler-final-heun": (
        "dpmpp_2m", DPM,
        {"final_sigmas_type": "sigma_min", "euler_at_final": True, "solver_type": "heun"}, 0.0,
    ),
    "dpmpp-3m-cosine": (  # name=None: the sampler comes from _class_name, solver_order from the config
        None, DPM,
        {"_class_name": DPM, "solver_order": 3, "beta_schedule": "squaredcos_cap_v2",
         "use_karras_sigmas": True},
        0.0,
    ),
    "dpmpp-2m-zero-snr": ("dpmpp_2m", DPM, ZERO_SNR, 0.0),
    "lcm-sd15": ("lcm", LCM, {}, 0.0),
    "lcm-v-clip-scaling": (
        "lcm", LCM,
        {"prediction_type": "v_prediction", "clip_sample": True, "clip_sample_range": 1.5, "timestep_scaling": 5.5,
         "original_inference_steps": 100, "set_alpha_to_one": True},
        0.0,
    ),
    "lcm-sample-pred-cosine": (
        "lcm", LCM, {"prediction_type": "sample", "beta_schedule": "squaredcos_cap_v2"}, 0.0,
    ),
    # Few-step distilled models (SDXL-Lightning, Hyper-SD) sample with trailing spacing on SDXL's config.
    "euler-lightning": ("euler", EULER, {**SDXL, "timestep_spacing": "trailing"}, 0.0),
    "ddim-hyper": ("ddim", DDIM, {**SDXL, "timestep_spacing": "trailing"}, 0.0),
}  # fmt: skip
# Closed-form schedules (sigmas, Karras timesteps) take a handful of float32 sqrt/exp/log each, and torch's
# vectorised versions round differently on different CPUs: a few ulps per value, so a relative error (norm over
# the schedule) far below 1e-6. Zero-SNR rescaling subtracts nearly equal numbers near t = 0, which amplifies
# those ulps in the smallest sigmas (up to ~4e-6 element-wise on AMD) but not in the norm (~2e-7).
CLOSED_FORM = 1e-6
IMPLIED = {"dpmpp_2m": {"use_karras_sigmas": False}, "dpmpp_2m_karras": {"use_karras_sigmas": True}}
SHAPE = (2, 4, 8, 8)


def _make(case_id):
    name, cls_name, overrides, eta = CASES[case_id]
    config = {**SD15, **overrides}
    ours = make_scheduler(name, config)
    ref = getattr(diffusers, cls_name).from_config({**config, **IMPLIED.get(name, {})})
    return ours, ref, eta


def _reference_timesteps(ref, steps, strength):
    """diffusers' img2img `get_timesteps`: set_timesteps, then skip the first t_start steps."""
    ref.set_timesteps(steps)
    t_start = steps - min(int(steps * strength), steps)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(t_start)
    return t_start, ref.timesteps[t_start:]


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("steps", [3, 10, 25, 50])
@pytest.mark.parametrize("case_id", CASES)
def test_timesteps_and_sigmas_are_diffusers_exactly(case_id, steps, strength):
    ours, ref, _ = _make(case_id)
    if case_id == "pndm-prk" and steps == 3:
        pytest.skip("diffusers' PRK warm-up needs at least 4 steps")
    plan = ours.plan(steps, strength=strength)
    t_start, ref_timesteps = _reference_timesteps(ref, steps, strength)
    if ref_timesteps.is_floating_point():
        # Fractional (Karras) timesteps interpolate log training sigmas, which carry the rounding of torch's
        # vectorised sqrt/log; those differ between CPUs (AMD, Intel) by a few float32 ulps.
        assert rel_err(plan.timesteps, ref_timesteps.numpy()) < CLOSED_FORM
    else:
        np.testing.assert_array_equal(np.asarray(plan.timesteps), ref_timesteps.numpy())
    assert plan.timesteps.dtype == (jnp.float32 if ref_timesteps.is_floating_point() else jnp.int32)
    assert plan.num_steps == len(ref_timesteps)
    if plan.sigmas is not None:
        assert rel_err(plan.sigmas, ref.sigmas[t_start:].numpy()) < CLOSED_FORM
    assert rel_err(plan.init_noise_sigma, ref.init_noise_sigma) < CLOSED_FORM
    assert int(plan.latent_timestep) == int(ref_timesteps[0])


def _fake_unet(x, t):
    """A deterministic stand-in for the UNet that both sides evaluate in float32."""
    return 0.1 * x + jnp.cos(jnp.asarray(t, jnp.float32) / 100).astype(x.dtype)


def _fake_unet_torch(x, t):
    return 0.1 * x + torch.cos(torch.as_tensor(t).to(torch.float32) / 100)


@functools.partial(jax.jit, static_argnums=0)
def _our_loop(sched, plan, latents, noises):
    """The whole denoising loop in one fori_loop with a traced step index; returns every step's sample."""
    state = sched.init_state(plan, latents.shape, latents.dtype)
    trajectory = jnp.zeros((plan.num_steps, *latents.shape), latents.dtype)

    def body(i, carry):
        x, state, trajectory = carry
        model_output = _fake_unet(sched.scale_model_input(plan, x, i), plan.timesteps[i])
        x, state = sched.step(plan, state, model_output, x, i, noise=noises[i] if plan.needs_noise else None)
        return x, state, trajectory.at[i].set(x)

    return jax.lax.fori_loop(0, plan.num_steps, body, (latents, state, trajectory))[2]


def _reference_loop(ref, steps, strength, start, noise, noises, eta, monkeypatch):
    t_start, timesteps = _reference_timesteps(ref, steps, strength)
    if strength < 1.0:
        latents = ref.add_noise(torch.from_numpy(start), torch.from_numpy(noise), timesteps[:1])
    else:
        latents = torch.from_numpy(noise) * ref.init_noise_sigma
    drawn = iter(torch.from_numpy(n) for n in noises)
    module = __import__(type(ref).__module__, fromlist=["randn_tensor"])
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: next(drawn), raising=False)
    extra = {"eta": eta, "variance_noise": next(drawn)} if eta else {}
    out = []
    for t in timesteps:
        model_output = _fake_unet_torch(ref.scale_model_input(latents, t), t)
        latents = ref.step(model_output, t, latents, **extra).prev_sample
        if eta:
            extra["variance_noise"] = next(drawn, None)
        out.append(latents.numpy())
    return np.stack(out)


def trajectory_error(case_id, steps, strength, monkeypatch):
    """Relative L2 error ||ours - diffusers|| / ||diffusers|| of the sample after every step, and the largest
    shrink of the sample in one step so far (||input|| / ||output||, the initial latents included)."""
    ours, ref, eta = _make(case_id)
    rng = np.random.default_rng(zlib.crc32(f"{case_id}/{steps}".encode()))
    start, noise = (rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(2))
    plan = ours.plan(steps, strength=strength, eta=eta)
    noises = rng.standard_normal((plan.num_steps + 1, *SHAPE), dtype=np.float32)

    expected = _reference_loop(ref, steps, strength, start, noise, noises, eta, monkeypatch)
    if strength < 1.0:
        latents = ours.add_noise(plan, jnp.asarray(start), jnp.asarray(noise), 0)
    else:
        latents = jnp.asarray(noise) * plan.init_noise_sigma
    got = np.asarray(_our_loop(ours, plan, latents, jnp.asarray(noises)))
    assert got.shape == expected.shape
    err = np.linalg.norm((got - expected).reshape(len(got), -1), axis=1)
    norms = np.linalg.norm(expected.reshape(len(got), -1), axis=1)
    inputs = np.concatenate([[np.linalg.norm(np.asarray(latents))], norms[:-1]])
    return err / norms, np.maximum.accumulate(inputs / norms)


# Ten steps exercise the warm-up and lower-order endings; 25 at strength 0.6 an img2img start mid-schedule.
RUNS = [(c, 10, 1.0) for c in CASES] + [(c, 25, 0.6) for c in CASES]
RUNS += [(c, 25, 1.0) for c in ("pndm-sd15", "euler-sdxl", "dpmpp-2m-karras", "euler-a-sdxl")]
RUNS += [(c, n, 1.0) for c in ("lcm-sd15", "euler-lightning", "ddim-hyper") for n in (1, 2, 4, 8)]
RUNS += [("lcm-sd15", 4, 0.5), ("lcm-v-clip-scaling", 6, 0.5)]


@pytest.mark.parametrize(("case_id", "steps", "strength"), RUNS)
def test_denoising_loop_matches_diffusers(case_id, steps, strength, monkeypatch):
    """1e-5 of the sample, or what float32 explains where a step cancels: a step whose output is A times smaller
    than its input carries its input's rounding, a few float32 epsilons of the input on either side (8 eps x A of
    the output; the relative error then travels with the sample). Zero-SNR Euler's first step goes from sigma 4096
    to a sample 226x smaller: the sides differ by 0.35-0.43 eps of the input there, 0.94e-5 of the output with
    XLA's optimised code and 1.15e-5 without; every other case shrinks at most 2.6x in a step (1e-5 holds)."""
    err, shrink = trajectory_error(case_id, steps, strength, monkeypatch)
    allowed = np.maximum(1e-5, 8 * np.finfo(np.float32).eps * shrink)
    assert (err < allowed).all(), f"relative error per step: {err}, allowed: {allowed}"


@pytest.mark.parametrize(
    "case_id",
    ["ddim-sd15", "pndm-sd15", "euler-sdxl", "euler-a-trailing-v", "dpmpp-2m-karras", "dpmpp-2m-zero-snr"],
)
def test_add_noise_matches_diffusers_at_every_step(case_id):
    """What inpainting does after each step: noise the clean latents to the next step's level."""
    ours, ref, _ = _make(case_id)
    plan = ours.plan(10)
    ref.set_timesteps(10)
    rng = np.random.default_rng(1)
    x0, noise = (rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(2))
    add = jax.jit(ours.add_noise)
    for i in range(plan.num_steps):
        got = np.asarray(add(plan, jnp.asarray(x0), jnp.asarray(noise), jnp.int32(i)))
        want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ref.timesteps[i : i + 1]).numpy()
        # One multiply-add per element (an FMA in XLA, two roundings in torch) with coefficients from torch's
        # sqrt of the schedule, whose rounding depends on the CPU: a few float32 ulps per element.
        assert rel_err(got, want) < 1e-6, i


@pytest.mark.parametrize("case_id", ["ddim-eta", "pndm-prk", "euler-sdxl", "euler-a-sdxl", "dpmpp-3m-cosine"])
def test_bfloat16_latents_keep_their_dtype_under_strict_promotion(case_id):
    ours, _, eta = _make(case_id)
    plan = ours.plan(10, eta=eta)
    rng = np.random.default_rng(2)
    noise = rng.standard_normal(SHAPE, dtype=np.float32) * plan.init_noise_sigma
    noises = rng.standard_normal((plan.num_steps, *SHAPE), dtype=np.float32)
    full = _our_loop(ours, plan, jnp.asarray(noise), jnp.asarray(noises))[-1]
    half = _our_loop(ours, plan, jnp.asarray(noise, jnp.bfloat16), jnp.asarray(noises, jnp.bfloat16))[-1]
    assert half.dtype == jnp.bfloat16
    assert np.linalg.norm(np.float32(half) - full) < 0.05 * np.linalg.norm(full)

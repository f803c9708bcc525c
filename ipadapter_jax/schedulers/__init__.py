"""Samplers as pure JAX functions matching diffusers' schedulers (timesteps and float32 step math).

sched = load_scheduler("path/to/model/scheduler")          # or make_scheduler("euler", config_dict)
plan = sched.plan(num_inference_steps, strength=1.0)      # host side, once per run
state = sched.init_state(plan, latents.shape, latents.dtype)
# inside one lax.fori_loop over i in range(plan.num_steps):
x_in = sched.scale_model_input(plan, latents, i)          # the UNet sees (x_in, plan.timesteps[i])
latents, state = sched.step(plan, state, model_output, latents, i, noise=None)
# img2img / inpainting: sched.add_noise(plan, x0, noise, i) noises clean latents to step i's level.

Timesteps, sigmas and per-step scalars are diffusers' own numbers (computed on the host in numpy with
diffusers' dtypes). The jitted step repeats diffusers' float32 operations in order; it differs only where
XLA fuses a multiply and an add into one FMA (about 1e-7 relative per step).
"""

from ipadapter_jax.schedulers.common import (
    Plan,
    Scheduler,
    alphas_cumprod_for_config,
    betas_for_config,
)
from ipadapter_jax.schedulers.ddim import DDIM
from ipadapter_jax.schedulers.ddpm import ddpm_add_noise, snr, training_target, velocity
from ipadapter_jax.schedulers.dpm import DPMSolverMultistep
from ipadapter_jax.schedulers.euler import EulerAncestral, EulerDiscrete
from ipadapter_jax.schedulers.lcm import LCM
from ipadapter_jax.schedulers.pndm import PNDM
from ipadapter_jax.schedulers.registry import SCHEDULERS, load_scheduler, make_scheduler

__all__ = [
    "DDIM",
    "LCM",
    "PNDM",
    "SCHEDULERS",
    "DPMSolverMultistep",
    "EulerAncestral",
    "EulerDiscrete",
    "Plan",
    "Scheduler",
    "alphas_cumprod_for_config",
    "betas_for_config",
    "ddpm_add_noise",
    "load_scheduler",
    "make_scheduler",
    "snr",
    "training_target",
    "velocity",
]

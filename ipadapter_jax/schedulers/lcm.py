"""Latent Consistency Model sampling (diffusers' `LCMScheduler`), for LCM-LoRA and LCM-distilled UNets.

Each step predicts the clean latents through the consistency boundary condition
(`denoised = c_out * x0 + c_skip * x`), then re-noises them to the next timestep with fresh noise; the last step
returns the denoised latents. Timesteps are `num_inference_steps` picks, evenly spaced by index, from the
`original_inference_steps` schedule the model was distilled on.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ipadapter_jax.errors import ConfigError
from ipadapter_jax.schedulers.common import Plan, Scheduler, f32, predicted_original, require_choice, require_off

_SIGMA_DATA = np.float32(0.5)


def lcm_timesteps(num_train: int, original_steps: int, n: int) -> np.ndarray:
    """Descending int64 timesteps: n picks, by floored evenly spaced index, of the distillation schedule
    `k - 1, 2k - 1, ..., original_steps * k - 1` with `k = num_train // original_steps`."""
    k = num_train // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    picks = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    return origin[picks].astype(np.int64)


def boundary_scalings(timesteps: np.ndarray, timestep_scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """The consistency model's (c_skip, c_out) at each discrete timestep, in float32 as diffusers computes them."""
    scaled = timesteps.astype(np.float32) * np.float32(timestep_scaling)
    denominator = scaled * scaled + _SIGMA_DATA * _SIGMA_DATA
    return (_SIGMA_DATA * _SIGMA_DATA) / denominator, scaled / np.sqrt(denominator)


class LCM(Scheduler):
    class_name = "LCMScheduler"
    defaults = {
        "beta_start": 0.00085,  # LCMScheduler's own defaults (the SD noise schedule), not DDPM's
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "thresholding": False,
        "timestep_scaling": 10.0,
    }

    def _validate(self) -> None:
        require_choice(self.fields, "prediction_type", ("epsilon", "sample", "v_prediction"), self.class_name)
        require_off(self.fields, ("thresholding",), self.class_name)
        original = self.fields["original_inference_steps"]
        if not isinstance(original, int) or not 1 <= original <= self.num_train_timesteps:
            raise ConfigError(f"{self.class_name}: original_inference_steps={original!r} must be an integer from 1 "
                              f"to num_train_timesteps ({self.num_train_timesteps}).")

    def _plan(self, n: int, t_start: int, eta: float) -> Plan:
        f, ac = self.fields, self.alphas_cumprod
        original = f["original_inference_steps"]
        if n > original:
            raise ConfigError(f"num_inference_steps={n} exceeds this LCM's original_inference_steps={original}; "
                              "use at most that many steps (LCMs sample well in 2-8).")
        timesteps = lcm_timesteps(self.num_train_timesteps, original, n)
        a_t = ac[timesteps]
        a_prev = ac[np.concatenate([timesteps[1:], timesteps[-1:]])]
        c_skip, c_out = boundary_scalings(timesteps, f["timestep_scaling"])
        last = np.arange(n) == n - 1  # the last step returns the denoised latents: no re-noising
        coeffs = {
            "sqrt_a_t": np.sqrt(a_t),
            "sqrt_b_t": np.sqrt(np.float32(1.0) - a_t),
            "c_skip": c_skip,
            "c_out": c_out,
            "renoise_x0": np.where(last, np.float32(1.0), np.sqrt(a_prev)),
            "renoise_eps": np.where(last, np.float32(0.0), np.sqrt(np.float32(1.0) - a_prev)),
            "noise_x0": np.sqrt(a_t),
            "noise_eps": np.sqrt(np.float32(1.0) - a_t),
        }
        return Plan(
            timesteps=jnp.asarray(timesteps[t_start:], jnp.int32),
            sigmas=None,
            coeffs={k: f32(v[t_start:]) for k, v in coeffs.items()},
            num_steps=n - t_start,
            init_noise_sigma=1.0,
            needs_noise=n - t_start > 1,
        )

    def step(self, plan, state, model_output, sample, i, noise=None):
        self._require_noise(plan, noise)
        c = {k: v[i] for k, v in plan.coeffs.items()}
        x = sample.astype(jnp.float32)
        out = model_output.astype(jnp.float32)
        clip = float(self.fields["clip_sample_range"]) if self.fields["clip_sample"] else None
        x0, _ = predicted_original(self.fields["prediction_type"], x, out, c["sqrt_a_t"], c["sqrt_b_t"], clip)
        denoised = c["c_out"] * x0 + c["c_skip"] * x
        if plan.needs_noise:
            denoised = c["renoise_x0"] * denoised + c["renoise_eps"] * noise.astype(jnp.float32)
        return denoised.astype(sample.dtype), state

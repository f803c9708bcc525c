"""DDIM (diffusers' `DDIMScheduler`), deterministic or with eta-scaled fresh noise."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ipadapter_jax.schedulers.common import (
    SPACINGS,
    Plan,
    Scheduler,
    discrete_timesteps,
    f32,
    predicted_original,
    require_choice,
    require_off,
)


class DDIM(Scheduler):
    class_name = "DDIMScheduler"
    takes_eta = True
    defaults = {
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "thresholding": False,
        "timestep_spacing": "leading",
    }

    def _validate(self) -> None:
        require_choice(self.fields, "prediction_type", ("epsilon", "sample", "v_prediction"), self.class_name)
        require_choice(self.fields, "timestep_spacing", SPACINGS, self.class_name)
        require_off(self.fields, ("thresholding",), self.class_name)

    def _plan(self, n: int, t_start: int, eta: float) -> Plan:
        f, ac = self.fields, self.alphas_cumprod
        timesteps = discrete_timesteps(f["timestep_spacing"], self.num_train_timesteps, n, f["steps_offset"])
        # The previous timestep is one `num_train // n` stride back whatever the spacing (ref. §9.1).
        prev = timesteps - self.num_train_timesteps // n
        final = np.float32(1.0) if f["set_alpha_to_one"] else ac[0]
        a_t = ac[timesteps]
        a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(np.float32)
        b_t, b_prev = np.float32(1.0) - a_t, np.float32(1.0) - a_prev
        variance = (b_prev / b_t) * (np.float32(1.0) - a_t / a_prev)
        coeffs = {
            "sqrt_a_t": np.sqrt(a_t),
            "sqrt_b_t": np.sqrt(b_t),
            "a_prev": a_prev,
            "sqrt_a_prev": np.sqrt(a_prev),
            "variance": variance,
            "eta": np.full(n, eta, np.float32),
            "noise_x0": np.sqrt(a_t),
            "noise_eps": np.sqrt(b_t),
        }
        return Plan(
            timesteps=jnp.asarray(timesteps[t_start:], jnp.int32),
            sigmas=None,
            coeffs={k: f32(v[t_start:]) for k, v in coeffs.items()},
            num_steps=n - t_start,
            init_noise_sigma=1.0,
            needs_noise=eta > 0,
        )

    def step(self, plan, state, model_output, sample, i, noise=None):
        self._require_noise(plan, noise)
        c = {k: v[i] for k, v in plan.coeffs.items()}
        x = sample.astype(jnp.float32)
        out = model_output.astype(jnp.float32)
        clip = float(self.fields["clip_sample_range"]) if self.fields["clip_sample"] else None
        x0, eps = predicted_original(self.fields["prediction_type"], x, out, c["sqrt_a_t"], c["sqrt_b_t"], clip)
        std = c["eta"] * jnp.sqrt(c["variance"])
        direction = jnp.sqrt(1 - c["a_prev"] - std * std) * eps
        prev = c["sqrt_a_prev"] * x0 + direction
        if plan.needs_noise:
            prev = prev + std * noise.astype(jnp.float32)
        return prev.astype(sample.dtype), state

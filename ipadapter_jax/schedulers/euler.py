"""Euler and Euler ancestral (diffusers' `EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ipadapter_jax.schedulers.common import (
    SPACINGS,
    Plan,
    Scheduler,
    discrete_timesteps,
    divide,
    f32,
    interp_sigmas,
    karras_sigmas,
    require_choice,
    require_off,
    sigma_to_t,
    train_sigmas,
)


def sigma_timesteps(spacing: str, num_train: int, n: int, steps_offset: int) -> np.ndarray:
    """Descending float32 timesteps of the sigma-based samplers (linspace ones are fractional)."""
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, n, dtype=np.float32)[::-1].copy()
    return discrete_timesteps(spacing, num_train, n, steps_offset).astype(np.float32)


class _SigmaSampler(Scheduler):
    """Shared by both Euler variants: training sigmas, input scaling and the start-noise scale."""

    _ancestral = False

    def _train_sigmas(self) -> np.ndarray:
        ac = self.alphas_cumprod.copy()
        if self.fields["rescale_betas_zero_snr"]:
            ac[-1] = 2.0**-24  # diffusers keeps the last sigma finite
        return train_sigmas(ac)

    def _init_noise_sigma(self, sigmas: np.ndarray) -> float:
        top = sigmas.max()
        if self.fields["timestep_spacing"] in ("linspace", "trailing"):
            return float(top)
        return float(np.sqrt(top * top + np.float32(1.0)))

    def _make_plan(self, timesteps: np.ndarray, sigmas: np.ndarray, t_start: int, coeffs: dict) -> Plan:
        sig = sigmas[:-1]
        denominator = sig * sig + np.float32(1.0)
        coeffs = {
            "sigma": sig,
            "scale_in": np.sqrt(denominator),
            "v_out": -sig / np.sqrt(denominator),
            "v_skip_denominator": denominator,
            "noise_x0": np.ones_like(sig),
            "noise_eps": sig,
            **coeffs,
        }
        return Plan(
            timesteps=f32(timesteps[t_start:]),
            sigmas=f32(sigmas[t_start:]),
            coeffs={k: f32(v[t_start:]) for k, v in coeffs.items()},
            num_steps=len(timesteps) - t_start,
            init_noise_sigma=self._init_noise_sigma(sigmas),
            needs_noise=self._ancestral,
        )

    def scale_model_input(self, plan, sample, i):
        return divide(sample, plan.coeffs["scale_in"][i].astype(sample.dtype))

    def _denoised(self, c, out, x):
        kind = self.fields["prediction_type"]
        if kind == "epsilon":
            return x - c["sigma"] * out
        if kind == "v_prediction":
            return out * c["v_out"] + divide(x, c["v_skip_denominator"])
        return out  # "sample" / "original_sample"

    def step(self, plan, state, model_output, sample, i, noise=None):
        self._require_noise(plan, noise)
        c = {k: v[i] for k, v in plan.coeffs.items()}
        out, x = model_output.astype(jnp.float32), sample.astype(jnp.float32)
        derivative = divide(x - self._denoised(c, out, x), c["sigma"])
        prev = x + derivative * c["dt"]
        if self._ancestral:
            prev = prev + noise.astype(jnp.float32) * c["sigma_up"]
        return prev.astype(model_output.dtype), state


class EulerDiscrete(_SigmaSampler):
    class_name = "EulerDiscreteScheduler"
    defaults = {
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
    }

    def _validate(self) -> None:
        owner, f = self.class_name, self.fields
        require_choice(f, "prediction_type", ("epsilon", "v_prediction", "sample", "original_sample"), owner)
        require_choice(f, "timestep_spacing", SPACINGS, owner)
        require_choice(f, "interpolation_type", ("linear",), owner)
        require_choice(f, "timestep_type", ("discrete",), owner)
        require_choice(f, "final_sigmas_type", ("zero", "sigma_min"), owner)
        require_off(f, ("use_exponential_sigmas", "use_beta_sigmas"), owner)

    def _plan(self, n: int, t_start: int, eta: float) -> Plan:
        f = self.fields
        train = self._train_sigmas()
        timesteps = sigma_timesteps(f["timestep_spacing"], self.num_train_timesteps, n, f["steps_offset"])
        sigmas = interp_sigmas(timesteps, train)
        if f["use_karras_sigmas"]:
            lo = f["sigma_min"] if f["sigma_min"] is not None else sigmas[-1].item()
            hi = f["sigma_max"] if f["sigma_max"] is not None else sigmas[0].item()
            sigmas = karras_sigmas(hi, lo, n)
            timesteps = sigma_to_t(sigmas, np.log(train)).astype(np.float32)
        last = train[0] if f["final_sigmas_type"] == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        # Euler without churn: sigma_hat == sigma, one explicit step to the next noise level.
        return self._make_plan(timesteps, sigmas, t_start, {"dt": sigmas[1:] - sigmas[:-1]})


class EulerAncestral(_SigmaSampler):
    class_name = "EulerAncestralDiscreteScheduler"
    defaults = {"timestep_spacing": "linspace"}
    _ancestral = True

    def _validate(self) -> None:
        require_choice(self.fields, "prediction_type", ("epsilon", "v_prediction"), self.class_name)
        require_choice(self.fields, "timestep_spacing", SPACINGS, self.class_name)

    def _plan(self, n: int, t_start: int, eta: float) -> Plan:
        f = self.fields
        timesteps = sigma_timesteps(f["timestep_spacing"], self.num_train_timesteps, n, f["steps_offset"])
        sigmas = np.concatenate([interp_sigmas(timesteps, self._train_sigmas()), [0.0]]).astype(np.float32)
        s_from, s_to = sigmas[:-1], sigmas[1:]
        # Split the step to s_to into a deterministic part down to sigma_down and fresh noise of sigma_up.
        up = np.sqrt((s_to * s_to) * (s_from * s_from - s_to * s_to) / (s_from * s_from))
        down = np.sqrt(s_to * s_to - up * up)
        return self._make_plan(timesteps, sigmas, t_start, {"dt": down - s_from, "sigma_up": up})

"""PNDM (diffusers' `PNDMScheduler`): PLMS linear multistep, optionally after the Runge-Kutta warm-up.

diffusers keeps a counter and a list of past model outputs; here the host replays that bookkeeping once
per plan, so each step only picks one of a few fixed formulas (`kind`) and a 4-slot history buffer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.errors import ConfigError
from ipadapter_jax.schedulers.common import (
    SPACINGS,
    Plan,
    Scheduler,
    discrete_timesteps,
    divide,
    f32,
    require_choice,
)

# What a step does with the model output; the order is the `lax.switch` branch order.
PLMS_FIRST, PLMS_AVERAGE, PLMS_2, PLMS_3, PLMS_4, PRK_0, PRK_1, PRK_2, PRK_3 = range(9)


def _push(history: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.concatenate([history[1:], x[None].astype(history.dtype)])


class PNDM(Scheduler):
    class_name = "PNDMScheduler"
    defaults = {"skip_prk_steps": False, "set_alpha_to_one": False, "timestep_spacing": "leading"}

    def _validate(self) -> None:
        require_choice(self.fields, "prediction_type", ("epsilon", "v_prediction"), self.class_name)
        require_choice(self.fields, "timestep_spacing", SPACINGS, self.class_name)
        # PNDMScheduler has no zero-terminal-SNR option: diffusers ignores the key, and so do we.
        self.fields["rescale_betas_zero_snr"] = False

    @property
    def _prk(self) -> bool:
        return not self.fields["skip_prk_steps"]

    def _full_timesteps(self, n: int) -> tuple[np.ndarray, int]:
        """All timesteps of an n-step run and how many of them are Runge-Kutta steps."""
        f, T = self.fields, self.num_train_timesteps
        down = discrete_timesteps(f["timestep_spacing"], T, n, f["steps_offset"])
        if not self._prk:
            # PLMS needs a second evaluation at the second timestep before it can extrapolate.
            return np.concatenate([down[:2], down[1:]]) if n > 1 else down, 0
        if n < 4:
            raise ConfigError(
                f"{self.class_name} with skip_prk_steps=false needs at least 4 inference steps."
            )
        last4 = down[:4][::-1]  # the four highest timesteps, ascending
        halves = (last4[:, None] + np.array([0, T // n // 2])).reshape(-1)  # t, t + half-stride
        prk = np.repeat(halves[:-1], 2)[1:-1][::-1]  # 12 evaluations: 4 per Runge-Kutta step
        return np.concatenate([prk, down[3:]]), len(prk)

    def _plan(self, n: int, t_start: int, eta: float) -> Plan:
        T, ac = self.num_train_timesteps, self.alphas_cumprod
        full, n_prk = self._full_timesteps(n)
        run = full[t_start:]
        stride = T // n
        kinds, t_alpha, t_prev = [], [], []
        history = 0
        for k, t in enumerate(run.tolist()):
            if k < n_prk:  # diffusers indexes its full Runge-Kutta list by the counter, even for img2img
                kinds.append(PRK_0 + k % 4)
                t_alpha.append(full[k // 4 * 4])
                t_prev.append(t - (0 if k % 2 else stride // 2))
                history += k % 4 == 0
            elif k == 1:  # the repeated second evaluation: redo the first step with the averaged output
                kinds.append(PLMS_AVERAGE)
                t_alpha.append(t + stride)
                t_prev.append(t)
            else:
                history = min(history + 1, 4)
                kinds.append(PLMS_FIRST if k == 0 else PLMS_2 + history - 2)
                t_alpha.append(t)
                t_prev.append(t - stride)
        t_alpha, t_prev = np.asarray(t_alpha), np.asarray(t_prev)
        final = np.float32(1.0) if self.fields["set_alpha_to_one"] else ac[0]
        a_t = ac[t_alpha]
        a_prev = np.where(t_prev >= 0, ac[np.maximum(t_prev, 0)], final).astype(np.float32)
        b_t, b_prev = np.float32(1.0) - a_t, np.float32(1.0) - a_prev
        coeffs = {
            "kind": jnp.asarray(kinds, jnp.int32),
            "sample_coeff": f32(np.sqrt(a_prev / a_t)),
            "output_coeff": f32(a_prev - a_t),
            "denominator": f32(a_t * np.sqrt(b_prev) + np.sqrt(a_t * b_t * a_prev)),
            "sqrt_a_t": f32(np.sqrt(a_t)),
            "sqrt_b_t": f32(np.sqrt(b_t)),
            "noise_x0": f32(np.sqrt(ac[run])),
            "noise_eps": f32(np.sqrt(np.float32(1.0) - ac[run])),
        }
        return Plan(
            timesteps=jnp.asarray(run, jnp.int32),
            sigmas=None,
            coeffs=coeffs,
            num_steps=len(run),
            init_noise_sigma=1.0,
        )

    def init_state(self, plan, sample_shape, dtype):
        state = {"ets": jnp.zeros((4, *sample_shape), dtype), "cur_sample": jnp.zeros(sample_shape, dtype)}
        if self._prk:
            state["cur_model_output"] = jnp.zeros(sample_shape, dtype)
        return state

    def _branches(self):
        """One function per kind: (output, sample, state) -> (output to apply, sample to step from, state)."""

        def plms_first(out, x, s):
            return out, x, {**s, "ets": _push(s["ets"], out), "cur_sample": x.astype(s["cur_sample"].dtype)}

        def plms_average(out, x, s):
            return (out + s["ets"][3].astype(out.dtype)) / 2, s["cur_sample"].astype(out.dtype), s

        def plms(order):
            def branch(out, x, s):
                e = _push(s["ets"], out)
                e1, e2, e3, e4 = (e[3 - j].astype(out.dtype) for j in range(4))
                if order == 2:
                    mixed = (3 * e1 - e2) / 2
                elif order == 3:
                    mixed = divide(23 * e1 - 16 * e2 + 5 * e3, 12.0)
                else:
                    mixed = (1 / 24) * (55 * e1 - 59 * e2 + 37 * e3 - 9 * e4)
                return mixed, x, {**s, "ets": e}

            return branch

        def prk(phase):
            def branch(out, x, s):
                acc = s["cur_model_output"].astype(out.dtype)
                s = dict(s)
                if phase == 0:
                    s["ets"] = _push(s["ets"], out)
                    s["cur_sample"] = x.astype(s["cur_sample"].dtype)
                if phase == 3:
                    out, acc = acc + (1 / 6) * out, jnp.zeros_like(acc)
                else:
                    acc = acc + (1 / 6 if phase == 0 else 1 / 3) * out
                s["cur_model_output"] = acc.astype(s["cur_model_output"].dtype)
                return out, s["cur_sample"].astype(out.dtype), s

            return branch

        branches = [plms_first, plms_average, plms(2), plms(3), plms(4)]
        return branches + [prk(p) for p in range(4)] if self._prk else branches

    def step(self, plan, state, model_output, sample, i, noise=None):
        c = {k: v[i] for k, v in plan.coeffs.items()}
        out, x = model_output.astype(jnp.float32), sample.astype(jnp.float32)
        out, x, state = jax.lax.switch(c["kind"], self._branches(), out, x, state)
        if self.fields["prediction_type"] == "v_prediction":
            out = c["sqrt_a_t"] * out + c["sqrt_b_t"] * x
        prev = c["sample_coeff"] * x - divide(c["output_coeff"] * out, c["denominator"])
        return prev.astype(sample.dtype), state

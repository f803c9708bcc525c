"""DPM-Solver++ multistep (diffusers' `DPMSolverMultistepScheduler`, algorithm "dpmsolver++"), orders 1-3.

Which order each step uses (warm-up, `lower_order_final`, `euler_at_final`) is decided on the host; the
jitted step switches between three fixed update formulas fed with precomputed coefficients.
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
    divide,
    f32,
    interp_sigmas,
    karras_sigmas,
    require_choice,
    require_off,
    sigma_to_t,
    train_sigmas,
)

_NO_LAMBDA_CLIP = -float("inf")


def _alpha_sigma(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(alpha_t, sigma_t) of the variance-preserving process at Karras noise level sigma, float32."""
    alpha = np.float32(1.0) / np.sqrt(sigma * sigma + np.float32(1.0))
    return alpha, sigma * alpha


class DPMSolverMultistep(Scheduler):
    class_name = "DPMSolverMultistepScheduler"
    defaults = {
        "solver_order": 2,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "sigma_min": None,  # not DPM init arguments, but diffusers' Karras sigmas read them when present
        "sigma_max": None,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": _NO_LAMBDA_CLIP,
        "timestep_spacing": "linspace",
        "thresholding": False,
        "variance_type": None,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "use_dynamic_shifting": False,
    }

    def _validate(self) -> None:
        owner, f = self.class_name, self.fields
        # diffusers silently maps the DEIS/UniPC names it shares configs with onto these.
        if f["algorithm_type"] == "deis":
            f["algorithm_type"] = "dpmsolver++"
        if f["solver_type"] in ("logrho", "bh1", "bh2"):
            f["solver_type"] = "midpoint"
        require_choice(f, "algorithm_type", ("dpmsolver++",), owner)
        require_choice(f, "solver_order", (1, 2, 3), owner)
        require_choice(f, "solver_type", ("midpoint", "heun"), owner)
        require_choice(f, "prediction_type", ("epsilon", "v_prediction", "sample"), owner)
        require_choice(f, "timestep_spacing", SPACINGS, owner)
        require_choice(f, "final_sigmas_type", ("zero", "sigma_min"), owner)
        require_choice(f, "variance_type", (None,), owner)
        require_off(f, ("thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"), owner)
        require_off(f, ("use_flow_sigmas", "use_dynamic_shifting"), owner)
        if f["lambda_min_clipped"] is None:
            raise ConfigError(f"{owner}: lambda_min_clipped must be a number (default -inf).")

    def _train_alphas_cumprod(self) -> np.ndarray:
        ac = self.alphas_cumprod.copy()
        if self.fields["rescale_betas_zero_snr"]:
            ac[-1] = 2.0**-24  # diffusers keeps the last sigma finite
        return ac

    def _timesteps(self, n: int, ac: np.ndarray) -> np.ndarray:
        f, T = self.fields, self.num_train_timesteps
        lam = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1.0) - ac))
        last = T - int(np.searchsorted(lam[::-1], f["lambda_min_clipped"]))
        spacing = f["timestep_spacing"]
        if spacing == "linspace":
            grid = np.linspace(0, last - 1, n + 1).round()
        elif spacing == "leading":
            grid = np.arange(n + 1) * (last // (n + 1)) + f["steps_offset"]
        else:  # trailing: the stride uses all training steps even when lambda clipping lowers the top
            return np.arange(last, 0, -T / n).round().astype(np.int64) - 1
        return grid[::-1][:-1].astype(np.int64)  # n + 1 points, highest n of them

    def _plan(self, n: int, t_start: int, eta: float) -> Plan:
        f = self.fields
        ac = self._train_alphas_cumprod()
        train = train_sigmas(ac)
        timesteps = self._timesteps(n, ac)
        if f["use_karras_sigmas"]:
            lo = f["sigma_min"] if f["sigma_min"] is not None else train[0].item()
            hi = f["sigma_max"] if f["sigma_max"] is not None else train[-1].item()
            sigmas = karras_sigmas(hi, lo, n)
            timesteps = sigma_to_t(sigmas, np.log(train))
            if f["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
            timesteps = timesteps.astype(np.int64)
        else:
            sigmas = interp_sigmas(timesteps, train)
        last = train[0] if f["final_sigmas_type"] == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        coeffs = self._coefficients(sigmas, len(timesteps), t_start)
        return Plan(
            timesteps=jnp.asarray(timesteps[t_start:], jnp.int32),
            sigmas=f32(sigmas[t_start:]),
            coeffs={k: (jnp.asarray(v, jnp.int32) if k == "kind" else f32(v)) for k, v in coeffs.items()},
            num_steps=len(timesteps) - t_start,
            init_noise_sigma=1.0,
        )

    def _coefficients(self, sigmas: np.ndarray, total: int, t_start: int) -> dict[str, list]:
        """Per executed step: the update order and its scalars, as diffusers' float32 0-d tensors give."""
        f, order = self.fields, self.fields["solver_order"]
        short = f["lower_order_final"] and total < 15
        alpha, sigma = _alpha_sigma(sigmas)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            lam = np.log(alpha) - np.log(sigma)  # +inf at a final sigma of zero
        names = (
            "kind",
            "alpha_s",
            "sigma_s",
            "ratio",
            "phi",
            "inv_r0",
            "inv_r1",
            "r0_share",
            "inv_r01",
            "c1",
            "c2",
        )
        out: dict[str, list] = {k: [] for k in names}
        for k in range(total - t_start):
            s = t_start + k
            warm = min(k, order)  # diffusers' lower_order_nums: counts steps actually run
            final = s == total - 1 and (f["euler_at_final"] or short or f["final_sigmas_type"] == "zero")
            if order == 1 or warm < 1 or final:
                kind = 0
            elif order == 2 or warm < 2 or (s == total - 2 and short):
                kind = 1
            else:
                kind = 2
            row = dict.fromkeys(names, np.float32(0.0))
            row.update(kind=kind, alpha_s=alpha[s], sigma_s=sigma[s], ratio=sigma[s + 1] / sigma[s])
            with np.errstate(over="ignore", invalid="ignore"):
                h = lam[s + 1] - lam[s]
                em1 = np.exp(-h) - np.float32(1.0)
                row["phi"] = alpha[s + 1] * em1
                if kind >= 1:
                    r0 = (lam[s] - lam[s - 1]) / h
                    row["inv_r0"] = np.float32(1.0) / r0
                    psi = alpha[s + 1] * (em1 / h + np.float32(1.0))
                    row["c1"] = -(np.float32(0.5) * row["phi"]) if f["solver_type"] == "midpoint" else psi
                if kind == 2:
                    r1 = (lam[s - 1] - lam[s - 2]) / h
                    row["inv_r1"] = np.float32(1.0) / r1
                    row["r0_share"] = r0 / (r0 + r1)
                    row["inv_r01"] = np.float32(1.0) / (r0 + r1)
                    row["c1"] = psi
                    row["c2"] = -(alpha[s + 1] * ((em1 + h) / (h * h) - np.float32(0.5)))
            for key in names:
                out[key].append(row[key])
        out["noise_x0"], out["noise_eps"] = alpha[t_start:-1], sigma[t_start:-1]
        return out

    def init_state(self, plan, sample_shape, dtype):
        order = self.fields["solver_order"]
        return {"x0_history": jnp.zeros((order - 1, *sample_shape), dtype)} if order > 1 else {}

    def _denoised(self, c, out, x):
        kind = self.fields["prediction_type"]
        if kind == "epsilon":
            return divide(x - c["sigma_s"] * out, c["alpha_s"])
        if kind == "v_prediction":
            return c["alpha_s"] * x - c["sigma_s"] * out
        return out

    def step(self, plan, state, model_output, sample, i, noise=None):
        c = {k: v[i] for k, v in plan.coeffs.items()}
        x = sample.astype(jnp.float32)
        m0 = self._denoised(c, model_output.astype(jnp.float32), x)
        order = self.fields["solver_order"]
        past = (
            [state["x0_history"][j].astype(jnp.float32) for j in range(order - 2, -1, -1)]
            if order > 1
            else []
        )

        def first(_):
            return c["ratio"] * x - c["phi"] * m0

        def second(_):
            d1 = c["inv_r0"] * (m0 - past[0])
            return c["ratio"] * x - c["phi"] * m0 + c["c1"] * d1

        def third(_):
            d1_0 = c["inv_r0"] * (m0 - past[0])
            d1_1 = c["inv_r1"] * (past[0] - past[1])
            d1 = d1_0 + c["r0_share"] * (d1_0 - d1_1)
            d2 = c["inv_r01"] * (d1_0 - d1_1)
            return c["ratio"] * x - c["phi"] * m0 + c["c1"] * d1 + c["c2"] * d2

        prev = jax.lax.switch(c["kind"], [first, second, third][:order], None)
        if order > 1:
            history = state["x0_history"]
            state = {"x0_history": jnp.concatenate([history[1:], m0[None].astype(history.dtype)])}
        return prev.astype(model_output.dtype), state

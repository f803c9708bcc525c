"""What every sampler shares: config fields, the training noise schedule, timestep spacing and the `Plan`.

Host-side numbers are computed in numpy with the dtypes diffusers uses (float32 tensors, float64 numpy
intermediates), so timesteps and per-step coefficients come out bit-identical; the jitted step only
gathers them with the traced step index.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.errors import ConfigError

# Fields every diffusers scheduler reads, with the defaults all of them share.
NOISE_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "rescale_betas_zero_snr": False,
    "prediction_type": "epsilon",
    "steps_offset": 0,
}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")


# ---------------------------------------------------------------- config fields


def read_fields(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The fields a sampler knows, from `config` or its diffusers default; other keys are ignored."""
    return {key: config.get(key, default) for key, default in defaults.items()}


def require_choice(fields: Mapping[str, Any], key: str, allowed: tuple, owner: str) -> None:
    if fields[key] not in allowed:
        raise ConfigError(
            f"{owner}: {key}={fields[key]!r} is not supported; use one of {', '.join(map(repr, allowed))}."
        )


def require_off(fields: Mapping[str, Any], keys: tuple[str, ...], owner: str) -> None:
    for key in keys:
        if fields.get(key):
            raise ConfigError(
                f"{owner}: {key}={fields[key]!r} is not supported by this port; set it to false."
            )


# ---------------------------------------------------------------- training noise schedule


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps, dtype=float32)` on CPU, bit for bit (filled from both ends)."""
    if steps == 1:
        return np.array([start], np.float32)
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps)
    from_start = np.float64(start32) + step * idx
    from_end = np.float64(end32) - step * (steps - 1 - idx)
    return np.where(idx < steps // 2, from_start, from_end).astype(np.float32)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The "squaredcos_cap_v2" schedule (improved DDPM), in float64 then rounded to float32."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, np.float32)


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
    """Cumulative product of 1 - beta; torch's CPU cumprod accumulates float32 in float64."""
    alphas = (np.float32(1.0) - betas.astype(np.float32)).astype(np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alphas_cumprod) so the last step has zero SNR (arXiv 2305.08891, Alg. 1)."""
    root = np.sqrt(alphas_cumprod_from_betas(betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alphas_bar = root * root
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def betas_for_config(config: Mapping[str, Any]) -> np.ndarray:
    """float32 betas of a diffusers scheduler config, as diffusers' schedulers build them."""
    f = read_fields(config, NOISE_DEFAULTS)
    n = int(f["num_train_timesteps"])
    if f["trained_betas"] is not None:
        betas = np.asarray(f["trained_betas"], np.float32)
        if betas.shape != (n,):
            raise ConfigError(
                f"Scheduler config: trained_betas has {betas.size} values but num_train_timesteps is {n}."
            )
    else:
        require_choice(f, "beta_schedule", BETA_SCHEDULES, "Scheduler config")
        if f["beta_schedule"] == "linear":
            betas = _torch_linspace_f32(f["beta_start"], f["beta_end"], n)
        elif f["beta_schedule"] == "scaled_linear":
            root = _torch_linspace_f32(f["beta_start"] ** 0.5, f["beta_end"] ** 0.5, n)
            betas = root * root
        else:
            betas = _cosine_betas(n)
    if f["rescale_betas_zero_snr"]:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod_for_config(config: Mapping[str, Any]) -> np.ndarray:
    """float32 alphas_cumprod as DDPM/DDIM/PNDM (and diffusers' training scripts) use it."""
    return alphas_cumprod_from_betas(betas_for_config(config))


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Karras-style noise levels sqrt((1 - a) / a) per training timestep, float32."""
    return np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod)


# ---------------------------------------------------------------- timesteps


def check_num_steps(num_inference_steps: int, num_train_timesteps: int) -> int:
    n = int(num_inference_steps)
    if n != num_inference_steps or not 1 <= n <= num_train_timesteps:
        raise ConfigError(
            f"num_inference_steps={num_inference_steps!r} must be an integer from 1 to {num_train_timesteps}."
        )
    return n


def start_index(num_inference_steps: int, strength: float) -> int:
    """First step an img2img run executes: diffusers' `get_timesteps` (`t_start`)."""
    if not 0.0 < strength <= 1.0:
        raise ConfigError(f"strength={strength!r} must be in (0, 1].")
    init_steps = min(int(num_inference_steps * strength), num_inference_steps)
    if init_steps == 0:
        raise ConfigError(
            f"strength={strength} with {num_inference_steps} steps runs no denoising step; raise either."
        )
    return num_inference_steps - init_steps


def discrete_timesteps(spacing: str, num_train: int, n: int, steps_offset: int) -> np.ndarray:
    """Descending integer timesteps of DDIM/PNDM-style `set_timesteps` (int64)."""
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return np.arange(n)[::-1].astype(np.int64) * (num_train // n) + steps_offset
    # trailing: a float stride down from num_train, rounded, shifted to end at index num_train - 1
    return np.round(np.arange(num_train, 0, -num_train / n)).astype(np.int64) - 1


def interp_sigmas(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Training sigmas linearly interpolated at (possibly fractional) timesteps, float64 like np.interp."""
    return np.interp(timesteps, np.arange(len(sigmas)), sigmas)


def karras_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Noise levels evenly spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5), float64."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma by interpolating in log-sigma (diffusers' `_sigma_to_t`)."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    above = (log_sigma[None, :] - log_train_sigmas[:, None]) >= 0
    low = np.cumsum(above, axis=0).argmax(axis=0).clip(max=len(log_train_sigmas) - 2)
    lo, hi = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


# ---------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Plan:
    """One run's schedule: what the UNet gets at step i, and the sampler's per-step scalars (a pytree).

    Steps before an img2img start are already dropped, so step i of the loop is index i here.
    """

    timesteps: jax.Array  # (num_steps,) int32 or float32, as diffusers hands them to the UNet
    sigmas: jax.Array | None  # (num_steps + 1,) float32 noise levels of sigma-based samplers, else None
    coeffs: dict[str, jax.Array]  # sampler-specific per-step float32/int32 scalars, each (num_steps,)
    num_steps: int  # UNet evaluations (PNDM with PLMS has one more than num_inference_steps)
    init_noise_sigma: float  # multiply the initial pure-noise latents by this
    needs_noise: bool = False  # step() must be given fresh noise (ancestral, or DDIM with eta > 0)

    @property
    def latent_timestep(self) -> jax.Array:
        """Timestep img2img noises its init latents to; `add_noise(plan, x0, noise, 0)` does exactly that."""
        return self.timesteps[0]


jax.tree_util.register_dataclass(
    Plan,
    data_fields=["timesteps", "sigmas", "coeffs"],
    meta_fields=["num_steps", "init_noise_sigma", "needs_noise"],
)


def f32(x: np.ndarray | float) -> jax.Array:
    return jnp.asarray(np.asarray(x, np.float32))


def divide(x: jax.Array, scalar: jax.Array | float) -> jax.Array:
    """`x / scalar` as a true IEEE division, like diffusers' torch code.

    XLA rewrites division by a broadcast scalar or a constant into multiplication by its reciprocal,
    which is off by an ulp often enough to show after the cancellations of a sampling step; the
    barrier hides the broadcast from that rewrite.
    """
    return x / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(scalar, x.dtype), x.shape))


def predicted_original(kind: str, sample: jax.Array, model_output: jax.Array, sqrt_a: jax.Array, sqrt_b: jax.Array,
                       clip_range: float | None = None) -> tuple[jax.Array, jax.Array]:
    """(x0, eps) from a model output of `kind` (epsilon, sample or v_prediction) at a step whose noise level is
    sqrt(alpha_bar) = `sqrt_a`, sqrt(1 - alpha_bar) = `sqrt_b`; x0 clipped to +-`clip_range` when given."""
    if kind == "epsilon":
        x0, eps = divide(sample - sqrt_b * model_output, sqrt_a), model_output
    elif kind == "sample":
        x0 = model_output
        eps = divide(sample - sqrt_a * x0, sqrt_b)
    else:  # v_prediction
        x0 = sqrt_a * sample - sqrt_b * model_output
        eps = sqrt_a * model_output + sqrt_b * sample
    if clip_range is not None:
        x0 = jnp.clip(x0, -clip_range, clip_range)
    return x0, eps


# ---------------------------------------------------------------- the sampler interface


class Scheduler:
    """A sampler: `plan` runs on the host; the other methods are pure and jit with a traced step index."""

    class_name = "Scheduler"  # the diffusers class whose numerics this matches
    defaults: dict[str, Any] = {}
    takes_eta = False

    def __init__(self, config: Mapping[str, Any]):
        self.fields = read_fields(config, {**NOISE_DEFAULTS, **self.defaults})
        self.num_train_timesteps = int(self.fields["num_train_timesteps"])
        self._validate()
        self.alphas_cumprod = alphas_cumprod_for_config(self.fields)

    def _validate(self) -> None:
        """Raise ConfigError for fields this port does not implement."""

    def plan(self, num_inference_steps: int, strength: float = 1.0, eta: float = 0.0) -> Plan:
        """diffusers' `set_timesteps`, then img2img's `get_timesteps` for strength < 1; eta is DDIM's."""
        n = check_num_steps(num_inference_steps, self.num_train_timesteps)
        if eta != 0.0 and not self.takes_eta:
            raise ConfigError(f"{self.class_name} has no eta; leave it at 0.")
        return self._plan(n, start_index(n, strength), float(eta))

    def _plan(self, n: int, t_start: int, eta: float) -> Plan:
        raise NotImplementedError

    def init_state(self, plan: Plan, sample_shape: tuple[int, ...], dtype: Any) -> dict[str, jax.Array]:
        """Fixed-size history buffers of multistep samplers (empty for one-step ones), for the loop carry."""
        return {}

    def scale_model_input(self, plan: Plan, sample: jax.Array, i: jax.Array) -> jax.Array:
        """What the UNet gets at step i in place of the sample (sigma samplers divide by sqrt(sigma^2+1))."""
        return sample

    def step(
        self, plan: Plan, state: dict, model_output: jax.Array, sample: jax.Array, i: jax.Array, noise=None
    ) -> tuple[jax.Array, dict]:
        """Step i: (sample at step i, model output) -> (sample at step i + 1, new state).

        `noise` is a fresh standard normal shaped like the sample, required when `plan.needs_noise`.
        """
        raise NotImplementedError

    def add_noise(self, plan: Plan, original: jax.Array, noise: jax.Array, i: jax.Array) -> jax.Array:
        """Noise clean latents to the level of step i (`i=0`: img2img start), as this diffusers class does."""
        a = plan.coeffs["noise_x0"][i].astype(original.dtype)
        b = plan.coeffs["noise_eps"][i].astype(original.dtype)
        return a * original + b * noise

    def _require_noise(self, plan: Plan, noise: jax.Array | None) -> None:
        if plan.needs_noise and noise is None:
            raise ValueError(
                f"{self.class_name}.step needs `noise` (a fresh standard normal like the sample)."
            )

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.fields == self.fields

    def __hash__(self) -> int:
        # By value: the config fixes every number a sampler computes, so equal samplers share compiled loops
        # (jit takes the sampler as a static argument) across pipelines and calls.
        return hash((type(self), json.dumps(self.fields, sort_keys=True, default=str)))

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.fields.items() if v != {**NOISE_DEFAULTS, **self.defaults}[k]}
        return f"{type(self).__name__}({changed})"

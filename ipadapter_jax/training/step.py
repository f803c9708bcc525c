"""The jitted training step: a pure function of plain pytrees.

    state  = {"params": {path: array}, "opt_state": optax state, "step": int32, "rng": uint32 key data}
    frozen = {path: array}      # every non-IPAdapterParam weight (UNet [+ VAE + encoders])
    consts = {"alphas_cumprod", "uncond": Unconditional}
    batch  = raw examples (pixel_values, clip_pixel_values, input_ids, ...) or cached encodings
             (moments, text, image[, pooled]) plus drop_image, drop_text, record_index[, time_ids]

Only the adapter parameters are differentiated and optimised: the split by ``IPAdapterParam`` type makes
the optimizer state exist for them alone. Gradient accumulation runs ``grad_accum_steps`` microbatches in
a ``lax.scan`` (rows ``i, i + A, i + 2A, ...`` form microbatch ``i``, so each device's rows spread over all
of them); random draws are made per record, so the result does not depend on the accumulation split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ipadapter_jax.models.adapter_spec import AdapterSpec
from ipadapter_jax.training import loss as loss_lib
from ipadapter_jax.training.config import OptimizerConfig


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then constant (the official recipe), cosine or linear decay to the end."""
    peak = config.lr
    decay_steps = max(total_steps - config.warmup_steps, 1)
    end = peak * config.end_lr_fraction
    if config.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif config.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.end_lr_fraction)
    else:
        after = optax.linear_schedule(peak, end, decay_steps)
    if config.warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, peak, config.warmup_steps)
    return optax.join_schedules([warmup, after], [config.warmup_steps])


def make_optimizer(config: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                       optax.Schedule]:
    """AdamW (torch semantics: decoupled decay on every adapter weight), optionally after global-norm clipping."""
    schedule = learning_rate_schedule(config, total_steps)
    adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay)
    if config.grad_clip_norm is None:
        return adamw, schedule
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw), schedule


@dataclasses.dataclass(frozen=True)
class StepSettings:
    spec: AdapterSpec
    loss: loss_lib.LossSettings
    grad_accum_steps: int = 1
    cached: bool = False  # batches carry encodings instead of raw examples
    remat: str = "none"  # applied per UNet block when the model is built (models/remat.py)


def _microbatches(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    """(B, ...) -> (n, B / n, ...): row r goes to microbatch r % n."""
    return {k: jnp.swapaxes(v.reshape(v.shape[0] // n, n, *v.shape[1:]), 0, 1) for k, v in batch.items()}


def make_microbatch_loss(merge: Callable, settings: StepSettings) -> Callable:
    """``loss(params, frozen, consts, microbatch, step_key) -> (loss, per-example MSE)``: what the step
    differentiates (planning also reads the activations its backward pass keeps from it)."""
    def microbatch_loss(params, frozen, consts, mb, step_key):
        model = merge(params, frozen)
        if settings.cached:
            enc = loss_lib.Encoded(moments=mb["moments"], text=mb["text"], image=mb["image"],
                                   pooled=mb.get("pooled"))
        else:
            enc = jax.lax.stop_gradient(loss_lib.encode(model, settings.spec, mb))
        enc = loss_lib.apply_drops(enc, mb["drop_image"], mb["drop_text"], consts["uncond"])
        latent_shape = enc.moments.shape[1:-1] + (enc.moments.shape[-1] // 2,)
        d = loss_lib.draws(step_key, mb["record_index"], latent_shape, settings.loss)
        loss, mse_B = loss_lib.loss_terms(model.unet, model.image_proj, settings.spec, consts["alphas_cumprod"],
                                          settings.loss, enc, mb.get("time_ids"), d)
        return loss, mse_B

    return microbatch_loss


def make_train_step(merge: Callable, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    settings: StepSettings, batch_sharding=None) -> Callable:
    """``train_step(state, frozen, consts, batch) -> (state, metrics)``; ``merge(params, frozen)`` rebuilds the
    TrainModel. ``batch_sharding`` (optional) constrains each microbatch to the batch layout."""
    grad_fn = jax.value_and_grad(make_microbatch_loss(merge, settings), has_aux=True)

    def train_step(state, frozen, consts, batch):
        step = state["step"]
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        n = settings.grad_accum_steps
        params = state["params"]
        if n == 1:
            (loss, _), grads = grad_fn(params, frozen, consts, batch, step_key)
        else:
            def body(carry, mb):
                if batch_sharding is not None:
                    mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sharding), mb)
                (mb_loss, _), mb_grads = grad_fn(params, frozen, consts, mb, step_key)
                total_loss, total_grads = carry
                return (total_loss + mb_loss, jax.tree.map(jnp.add, total_grads, mb_grads)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), _microbatches(batch, n))
            scale = jnp.float32(1.0 / n)
            loss = loss * scale
            grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
        # optax mixes Python scalars with int32 counts, which strict dtype promotion (our tests) rejects.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            new_params = optax.apply_updates(params, updates)
            lr = jnp.asarray(schedule(step), jnp.float32)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "learning_rate": lr,
                   "param_norm": optax.tree.norm(new_params)}
        new_state = {"params": new_params, "opt_state": opt_state, "step": step + 1, "rng": state["rng"]}
        return new_state, metrics

    return train_step


def init_state(params: dict[str, jax.Array], tx: optax.GradientTransformation, seed: int, opt_shardings,
               replicated) -> dict[str, Any]:
    """The initial train state: optimizer state created already sharded, step 0, the run's RNG key."""
    with jax.numpy_dtype_promotion("standard"):
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated)
    return {"params": params, "opt_state": opt_state, "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
            "rng": rng}

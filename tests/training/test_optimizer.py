"""The learning-rate schedules follow diffusers' (`diffusers.optimization.get_scheduler`, as the official and
diffusers training scripts use), and gradient clipping is part of the optimizer when configured."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ipadapter_jax.training import step as step_lib
from ipadapter_jax.training.config import OptimizerConfig

TOTAL, WARMUP, LR = 40, 8, 1e-3


@pytest.mark.parametrize("name", ["constant", "cosine", "linear"])
def test_schedule_matches_diffusers(torch, name):
    from diffusers.optimization import get_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=LR)
    diffusers_name = {"constant": "constant_with_warmup"}.get(name, name)
    ref_sched = get_scheduler(diffusers_name, opt, num_warmup_steps=WARMUP, num_training_steps=TOTAL)
    ref = []
    for _ in range(TOTAL):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        ref_sched.step()
    ours = step_lib.learning_rate_schedule(OptimizerConfig(lr=LR, schedule=name, warmup_steps=WARMUP), TOTAL)
    np.testing.assert_allclose([float(ours(s)) for s in range(TOTAL)], ref, rtol=1e-5, atol=1e-12)


def test_clipping_is_applied_before_adamw():
    params = {"w": jnp.zeros(3)}
    steps = [{"w": jnp.asarray([0.3, -0.4, 0.0])},   # norm 0.5: untouched by a clip at 1
             {"w": jnp.asarray([30.0, 40.0, 0.0])}]  # norm 50: scaled to norm 1
    config = OptimizerConfig(lr=LR, grad_clip_norm=1.0)
    tx, _ = step_lib.make_optimizer(config, TOTAL)
    plain = optax.adamw(LR, weight_decay=config.weight_decay)

    def run(opt, transform):
        state, out = opt.init(params), []
        for grads in steps:
            with jax.numpy_dtype_promotion("standard"):
                updates, state = opt.update(transform(grads), state, params)
            out.append(np.asarray(updates["w"]))
        return out

    def clip(grads):
        norm = optax.tree.norm(grads)
        return jax.tree.map(lambda g: g * jnp.minimum(1.0, 1.0 / norm), grads)

    ours, clipped, unclipped = run(tx, lambda g: g), run(plain, clip), run(plain, lambda g: g)
    for a, b in zip(ours, clipped, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not np.allclose(unclipped[1], clipped[1])  # clipping changes the second step's update

"""Initialisers: PyTorch-default uniform weights drawn without a program per shape, bit for bit what
`jax.random.uniform` draws for that shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ipadapter_jax.models import layers

SHAPES = [(1,), (7,), (32, 3), (3, 3, 4, 8), (257, 255), (3, 3, 64, 128), (1 << 16,), ((1 << 16) + 1,), (513, 511)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_uniform_init_is_jax_random_uniform_bit_for_bit(dtype):
    for i, shape in enumerate(SHAPES):
        key, bound = jax.random.key(i), 1.0 / np.sqrt(shape[-1] * 3 + i)
        ours = layers.uniform_init(key, shape, bound, dtype)
        reference = jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
        assert ours.shape == shape and ours.dtype == reference.dtype
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference), err_msg=str(shape))
    traced = jax.jit(lambda k: layers.uniform_init(k, (5, 6), 0.3, dtype))(jax.random.key(9))  # a model in jit
    np.testing.assert_array_equal(traced, jax.random.uniform(jax.random.key(9), (5, 6), jnp.float32, -0.3, 0.3)
                                  .astype(dtype))


def test_a_model_draws_its_weights_with_a_few_programs():
    before = layers._draw_uniform._cache_size()
    layers.Linear(3, 5, rngs=nnx.Rngs(0))
    layers.Conv2d(320, 640, rngs=nnx.Rngs(1))  # 1.8M weights: a longer draw, its own program
    layers.Conv2d(4, 8, rngs=nnx.Rngs(2))
    layers.Linear(7, 11, use_bias=False, rngs=nnx.Rngs(3))
    assert layers._draw_uniform._cache_size() - before <= 2  # MIN_DRAW numbers, and 2**21

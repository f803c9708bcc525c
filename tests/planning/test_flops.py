"""Model FLOPs counted from a traced program (planning/flops.py), against sizes worked out by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ipadapter_jax.planning.flops import jaxpr_flops


def _flops(fn, *args) -> float:
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def test_matrix_products_and_convolutions_count_exactly():
    a, b = jnp.ones((3, 5, 7)), jnp.ones((3, 7, 11))
    assert _flops(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b) == 2 * 3 * 5 * 7 * 11
    x, k = jnp.ones((2, 9, 9, 4)), jnp.ones((3, 3, 4, 6))  # NHWC, HWIO, "same": 2 x 9 x 9 x 6 outputs of 36 taps
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",  # noqa: E731
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert _flops(conv, x, k) == 2 * (2 * 9 * 9 * 6) * (3 * 3 * 4)
    grouped = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", feature_group_count=2,  # noqa: E731
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert _flops(grouped, x, jnp.ones((3, 3, 2, 6))) == 2 * (2 * 9 * 9 * 6) * (3 * 3 * 2)
    assert _flops(lambda x: jnp.tanh(x) * 2, x) == 0  # elementwise work is left out


def test_nested_programs_loops_and_branches():
    m = jnp.ones((4, 4))
    one = 2 * 4 * 4 * 4
    assert _flops(jax.jit(lambda m: m @ m), m) == one
    assert _flops(lambda m: jax.lax.scan(lambda c, _: (c @ m, None), m, None, length=5)[0], m) == 5 * one
    assert _flops(lambda m: jax.lax.cond(m[0, 0] > 0, lambda: m @ m @ m, lambda: m), m) == 2 * one


def test_remat_recomputation_shows_in_the_gradient():
    """The gradient in the second layer's weight of two layers (the first frozen): forward 2 products, backward 1
    (dW2 = h^T g; no input gradient is needed). Full remat computes the forward again inside the backward."""
    w1, w2, x = jnp.ones((8, 8)), jnp.ones((8, 8)), jnp.ones((16, 8))

    def layers(w2):
        return jnp.sum(jnp.tanh(jnp.tanh(x @ w1) @ w2))

    one = 2 * 16 * 8 * 8
    assert _flops(jax.grad(layers), w2) == 3 * one
    assert _flops(jax.grad(jax.checkpoint(layers, policy=jax.checkpoint_policies.nothing_saveable)), w2) == 5 * one
    # saving the products' outputs leaves nothing to recompute but the elementwise work
    assert _flops(jax.grad(jax.checkpoint(layers, policy=jax.checkpoint_policies.dots_saveable)), w2) == 3 * one

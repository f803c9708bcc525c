"""The attention implementations compute the same function (forward and gradients), and "auto" picks one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_models import rel_err

from ipadapter_jax.models.attention import attention


def _qkv(l=2048, s=2048, heads=2, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape).astype(np.float32))
                 for shape in ((1, l, heads, dim), (1, s, heads, dim), (1, s, heads, dim)))


def test_chunked_matches_plain_forward_and_gradients(torch):
    q, k, v = _qkv()
    plain = jax.jit(lambda q, k, v: attention(q, k, v, "xla"))(q, k, v)
    chunked = jax.jit(lambda q, k, v: attention(q, k, v, "chunked"))(q, k, v)
    assert rel_err(chunked, plain) < 1e-6
    reference = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(np.asarray(x).transpose(0, 2, 1, 3).copy()) for x in (q, k, v))).numpy()
    assert rel_err(np.asarray(chunked).transpose(0, 2, 1, 3), reference) < 1e-6

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, impl)))

    grads_plain = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
    grads_chunked = jax.jit(jax.grad(loss("chunked"), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(grads_chunked, grads_plain, strict=True):
        assert rel_err(a, b) < 1e-5


def test_auto_uses_the_blockwise_path_for_long_sequences_on_cpu():
    q, k, v = _qkv()
    text = jax.jit(lambda q, k, v: attention(q, k, v, "auto")).lower(q, k, v).as_text()
    assert "while" in text  # the per-head, per-block loops
    short = _qkv(l=64, s=77)
    assert "while" not in jax.jit(lambda q, k, v: attention(q, k, v, "auto")).lower(*short).as_text()


def test_unknown_implementation_is_an_error():
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attention(*_qkv(l=8, s=8), implementation="flash9")

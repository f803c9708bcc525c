"""The attention implementations compute the same function (forward and gradients), and "auto" picks one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_models import rel_err

from ipadapter_jax.errors import ConfigError
from ipadapter_jax.models.attention import attention
from ipadapter_jax.models.attention_policy import AttentionPolicy


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
    cpu = AttentionPolicy("auto", "cpu")
    text = jax.jit(lambda q, k, v: attention(q, k, v, cpu)).lower(q, k, v).as_text()
    assert "while" in text  # the per-head, per-block loops
    short = _qkv(l=64, s=77)
    assert "while" not in jax.jit(lambda q, k, v: attention(q, k, v, cpu)).lower(*short).as_text()
    # Without a target (and for other platforms) the CPU path is never taken.
    for policy in ("auto", AttentionPolicy("auto", "gpu"), AttentionPolicy("auto")):
        assert "while" not in jax.jit(lambda q, k, v, p=policy: attention(q, k, v, p)).lower(q, k, v).as_text()


@pytest.mark.parametrize(("platform", "l", "s", "d", "dtype", "expected"), [
    ("cpu", 4096, 4096, 40, jnp.bfloat16, "chunked"),
    ("cpu", 4096, 77, 40, jnp.bfloat16, "xla"),
    ("gpu", 4096, 4096, 64, jnp.bfloat16, "cudnn"),
    ("gpu", 256, 77, 160, jnp.bfloat16, "xla"),  # SD1.5's 160-wide heads: beyond cuDNN's 128
    ("gpu", 4096, 4096, 40, jnp.float32, "xla"),  # cuDNN's fused kernel takes half precision only
    ("tpu", 4096, 4096, 40, jnp.bfloat16, "pallas"),
    ("tpu", 1024, 1024, 64, jnp.bfloat16, "pallas"),
    ("tpu", 4096, 77, 40, jnp.bfloat16, "xla"),  # cross-attention: small scores, XLA estimated faster
    ("tpu", 256, 256, 160, jnp.bfloat16, "xla"),
    (None, 4096, 4096, 40, jnp.bfloat16, "xla"),
])
def test_policy_follows_the_target_platform(platform, l, s, d, dtype, expected):
    assert AttentionPolicy("auto", platform).choose((2, l, 8, d), (2, s, 8, d), dtype) == expected


def test_with_tokens_in_the_lanes_kernels_start_at_256_tokens_and_key_sets_join():
    v5p = AttentionPolicy("auto", "tpu", lanes=False, store_probs=True, tokens=True)
    assert v5p.choose((2, 256, 8, 160), (2, 256, 8, 160), jnp.bfloat16) == "pallas"  # SD1.5's 16x16 level
    assert v5p.choose((2, 64, 8, 160), (2, 64, 8, 160), jnp.bfloat16) == "xla"  # the 8x8 mid block
    assert v5p.joins_key_sets((2, 256, 8, 160), 77 + 16)
    assert not v5p.joins_key_sets((2, 256, 8, 160), 77 + 64)  # beyond one 128-key block
    assert not v5p.joins_key_sets((2, 64, 8, 160), 77 + 16)
    for other in (AttentionPolicy("auto", "tpu"), AttentionPolicy("xla", "tpu", tokens=True),
                  AttentionPolicy("auto", "gpu"), AttentionPolicy("auto", None)):
        assert not other.joins_key_sets((2, 4096, 8, 40), 77 + 16), other


def test_requested_cudnn_outside_its_limits_is_xla_decided_up_front():
    assert AttentionPolicy("cudnn", "gpu").choose((1, 64, 8, 160), (1, 77, 8, 160), jnp.bfloat16) == "xla"
    assert AttentionPolicy("cudnn", "gpu").choose((1, 64, 8, 64), (1, 77, 8, 64), jnp.bfloat16) == "cudnn"


def test_unknown_implementation_or_platform_is_an_error():
    with pytest.raises(ConfigError, match="flash9"):
        attention(*_qkv(l=8, s=8), implementation="flash9")
    with pytest.raises(ConfigError, match="quantum"):
        AttentionPolicy("auto", "quantum")

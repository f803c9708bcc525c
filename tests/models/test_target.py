"""Implementation choices follow the platform a model is built for (house rule 11), never the host's backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from kernel_calls import kernel_calls

from ipadapter_jax.errors import ConfigError
from ipadapter_jax.models.attention import Attention
from ipadapter_jax.models.layers import Conv2d, GroupNorm, LayerNorm, abstract_model
from ipadapter_jax.models.target import chip_of, platform_of, set_target
from ipadapter_jax.models.transformer import GEGLU, BasicTransformerBlock
from ipadapter_jax.models.unet import UNet2DConditionModel
from ipadapter_jax.models.unet_config import UNetConfig

# Three levels: the 32x32 level has 1024-token self-attention (the chunked/Pallas sizes), the 8x8 level
# 128-channel convolutions whose kernels dwarf their activations (where the CPU GEMM gradient pays).
TINY = UNetConfig.from_dict({
    "block_out_channels": [32, 64, 128], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1,
    "attention_head_dim": 2, "cross_attention_dim": 32, "norm_num_groups": 8})


def _unet(platform, chip: str | None = None):
    unet = abstract_model(lambda: UNet2DConditionModel(TINY, platform=platform, dtype=jnp.bfloat16,
                                                       rngs=nnx.Rngs(0)))
    set_target(unet, platform, chip=chip)  # as training and the pipeline do, with the chip of their mesh
    return nnx.split(unet)


def _training_gradient(platform, chip: str | None = None):
    graphdef, state = _unet(platform, chip)

    def loss(x, state):
        out = nnx.merge(graphdef, state)(x, jnp.int32(3), jnp.zeros((1, 77, 32), jnp.bfloat16))
        return jnp.sum(out.astype(jnp.float32))

    return jax.grad(loss), (jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.bfloat16), state)


def test_cpu_target_takes_the_cpu_paths_and_others_do_not():
    grad, args = _training_gradient("cpu")
    text = jax.jit(grad).lower(*args).as_text(debug_info=True)
    assert "cpu_chunked_attention" in text and "cpu_gemm_conv" in text
    grad, args = _training_gradient(None)  # no target: portable XLA paths
    text = jax.jit(grad).lower(*args).as_text(debug_info=True)
    assert "cpu_chunked_attention" not in text and "cpu_gemm_conv" not in text


def test_tpu_target_traced_on_a_cpu_host_uses_the_pallas_kernels():
    """The same host, a TPU target: the trace holds the Pallas kernel, not the CPU paths (the TPU-compiled HLO
    is checked in tests/planning/test_tpu_plan.py, which needs libtpu)."""
    grad, args = _training_gradient("tpu")
    jaxpr = str(jax.make_jaxpr(grad)(*args))
    assert jaxpr.count("pallas_call") >= 2  # forward and backward of the 1024-token self-attention
    assert "ipadapter_flash_fwd" in jaxpr and "ipadapter_flash_bwd" in jaxpr


def _kernel_layouts(jaxpr) -> list[str]:
    return [layout for _, layout in kernel_calls(jaxpr)]


def test_tpu_kernels_keep_tokens_in_the_lanes_on_v5p_and_heads_in_the_lanes_elsewhere():
    """The layouts the TPU compiler estimates faster for whole programs on each chip (bench/tpu_notes.md), in a
    training gradient and in a forward (generation) alike."""
    for chip, layout in (("v5p", "tokens"), ("v5e", "lanes"), ("v6e", "lanes"), (None, "lanes")):
        grad, args = _training_gradient("tpu", chip)
        training = _kernel_layouts(jax.make_jaxpr(grad)(*args).jaxpr)
        graphdef, state = _unet("tpu", chip)
        forward = _kernel_layouts(jax.make_jaxpr(lambda x, state, graphdef=graphdef: nnx.merge(graphdef, state)(
            x, jnp.int32(3), jnp.zeros((1, 77, 32), jnp.bfloat16)))(*args).jaxpr)
        assert len(training) >= 2 and set(training) == {layout}, chip  # forward and backward kernels
        assert len(forward) >= 1 and set(forward) == {layout}, chip


def test_v5p_training_keeps_the_probabilities_and_generation_does_not_write_them():
    """On v5p (tokens in the lanes) the training gradient's long self-attention stores P in the forward and reads
    it in the backward, and the feed-forward branch's input gradient is a kernel (models/pallas_feed_forward.py); a
    forward alone (generation) runs the plain flash forward; other chips recompute P."""
    for chip, training_kernels in (("v5p", {"ipadapter_probs_fwd", "ipadapter_probs_bwd", "ipadapter_ff_dx"}),
                                   ("v5e", {"ipadapter_flash_fwd", "ipadapter_flash_bwd"})):
        grad, args = _training_gradient("tpu", chip)
        assert {name for name, _ in kernel_calls(jax.make_jaxpr(grad)(*args).jaxpr)} == training_kernels, chip
        graphdef, state = _unet("tpu", chip)
        forward = kernel_calls(jax.make_jaxpr(lambda x, state, graphdef=graphdef: nnx.merge(graphdef, state)(
            x, jnp.int32(3), jnp.zeros((1, 77, 32), jnp.bfloat16)))(*args).jaxpr)
        assert {name for name, _ in forward} == {"ipadapter_flash_fwd"}, chip


def test_chip_of_reads_the_device_kind():
    class Device:
        def __init__(self, kind):
            self.device_kind = kind

    kinds = {"TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p", "TPU v6 lite": "v6e", "TPU v4": "v4"}
    for kind, chip in kinds.items():
        assert chip_of([Device(kind), Device(kind)]) == chip
    assert chip_of(jax.devices()) is None  # CPU devices
    assert chip_of([Device("TPU v5 lite"), Device("TPU v5")]) is None  # mixed kinds: no single chip


def test_set_target_makes_static_choices_on_every_module():
    unet = abstract_model(lambda: UNet2DConditionModel(TINY, platform="cpu", rngs=nnx.Rngs(0)))
    convs = [m for _, m in nnx.iter_modules(unet) if isinstance(m, Conv2d)]
    attentions = [m for _, m in nnx.iter_modules(unet) if isinstance(m, Attention)]
    geglus = [m for _, m in nnx.iter_modules(unet) if isinstance(m, GEGLU)]
    blocks = [m for _, m in nnx.iter_modules(unet) if isinstance(m, BasicTransformerBlock)]
    norms = [m for _, m in nnx.iter_modules(unet) if isinstance(m, GroupNorm | LayerNorm)]
    assert convs and all(c.for_cpu for c in convs)
    assert geglus and not any(g.recompute_gate for g in geglus)
    assert norms and not any(n.recompute_normalized for n in norms)
    assert attentions and all(a.attention_impl.platform == "cpu" for a in attentions)
    set_target(unet, "tpu")
    assert not any(c.for_cpu for c in convs)
    assert all(g.recompute_gate for g in geglus)  # the TPU feed-forward backward (models/transformer.py)
    assert not any(b.fused_feed_forward_grad for b in blocks)  # its kernel: tokens-layout chips only
    assert all(n.recompute_normalized for n in norms)  # and the normalizations' (models/layers.py)
    assert all(a.attention_impl.platform == "tpu" and a.attention_impl.requested == "auto" for a in attentions)
    assert all(a.attention_impl.lanes for a in attentions)
    assert not any(a.attention_impl.store_probs for a in attentions)
    assert not any(a.attention_impl.tokens for a in attentions)
    set_target(unet, "tpu", chip="v5p")
    assert not any(a.attention_impl.lanes for a in attentions)
    assert all(a.attention_impl.store_probs and a.attention_impl.tokens for a in attentions)
    assert all(b.fused_feed_forward_grad for b in blocks)  # models/pallas_feed_forward.py
    with pytest.raises(ConfigError, match="quantum"):
        set_target(unet, "quantum")


def test_platform_of_a_mesh_is_its_devices_platform():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
    assert platform_of(mesh) == "cpu"
    assert platform_of(jax.devices()[:1]) == "cpu"


def test_building_a_model_to_load_into_computes_nothing():
    """Under `shapes_only` every initial weight is a shape, norm scales included: an SD1.5 load built 550 norm
    fills eagerly, each a dispatch and a compile per new shape."""
    from ipadapter_jax.models.layers import GroupNorm, LayerNorm, shapes_only

    with shapes_only():
        norms = [GroupNorm(8, 32), LayerNorm(32)]
        unet = UNet2DConditionModel(TINY, platform="cpu", rngs=nnx.Rngs(0))
    leaves = [x for n in norms for x in jax.tree.leaves(nnx.state(n))]
    assert len(leaves) == 4 and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    params = jax.tree.leaves(nnx.state(unet, nnx.Param))
    assert params and all(isinstance(x, jax.ShapeDtypeStruct) for x in params)

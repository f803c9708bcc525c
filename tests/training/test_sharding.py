"""Sharding as data: mesh sizes with one -1 filled in, and the PartitionSpec of named parameters under the
default rules (frozen base FSDP-split, adapter replicated) on 8 fake CPU devices."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ipadapter_jax.errors import ConfigError
from ipadapter_jax.models.layers import abstract_model
from ipadapter_jax.models.unet import UNet2DConditionModel
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.sharding import DEFAULT_RULES, MeshConfig, axis_sizes, make_mesh, spec_for
from ipadapter_jax.training.model import flatten

SD15_LIKE = dict(block_out_channels=[320, 640], layers_per_block=1, cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], norm_num_groups=32)


def test_mesh_fills_one_axis():
    assert axis_sizes(MeshConfig(data=-1, fsdp=4), 8) == (2, 4)
    assert axis_sizes(MeshConfig(data=2, fsdp=-1), 8) == (2, 4)
    mesh = make_mesh(MeshConfig(data=-1, fsdp=2))
    assert mesh.axis_names == ("data", "fsdp") and mesh.devices.shape == (4, 2)
    with pytest.raises(ConfigError, match="needs 6 devices, but 8"):
        make_mesh(MeshConfig(data=3, fsdp=2))
    with pytest.raises(ConfigError, match="not a multiple of 3"):
        axis_sizes(MeshConfig(data=-1, fsdp=3), 8)


@pytest.fixture(scope="module")
def unet_params():
    unet = abstract_model(lambda: UNet2DConditionModel(UNetConfig.from_dict(SD15_LIKE), num_ip_adapters=1,
                                                      rngs=nnx.Rngs(0)))
    return {"unet/" + k: v for k, v in flatten(nnx.state(unet)).items()}


def test_default_rules_on_named_unet_parameters(unet_params):
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    attn2 = "unet/down_blocks/0/attentions/0/transformer_blocks/0/attn2"
    expected = {
        f"{attn2}/to_k/kernel": P("fsdp", None),  # (768, 320): the larger dimension
        f"{attn2}/to_q/kernel": P(None, "fsdp"),  # (320, 320): ties go to the output dimension
        f"{attn2}/to_out/0/bias": P("fsdp"),
        "unet/conv_in/kernel": P(None, None, None, "fsdp"),  # HWIO (3, 3, 4, 320)
        "unet/conv_out/kernel": P(None, None, "fsdp", None),  # (3, 3, 320, 4)
        "unet/conv_out/bias": P("fsdp"),  # (4,) splits over 4 devices
        f"{attn2}/to_k_ip/0/kernel": P(),  # adapter: replicated
        f"{attn2}/to_v_ip/0/kernel": P(),
        "unet/time_embedding/linear_1/kernel": P(None, "fsdp"),
        "image_proj/proj/kernel": P(),
    }
    shapes = {k: v.shape for k, v in unet_params.items()}
    shapes["image_proj/proj/kernel"] = (1024, 3072)
    for path, spec in expected.items():
        assert spec_for(path, shapes[path], DEFAULT_RULES, mesh) == spec, path
    # Over 8-way FSDP the 4-channel bias cannot split and stays replicated.
    mesh8 = make_mesh(MeshConfig(data=1, fsdp=8))
    assert spec_for("unet/conv_out/bias", (4,), DEFAULT_RULES, mesh8) == P()
    # Every parameter gets a spec that divides its shape.
    for path, shape in shapes.items():
        spec = spec_for(path, shape, DEFAULT_RULES, mesh)
        for dim, axis in zip(shape, spec, strict=False):
            assert axis is None or dim % mesh.shape[axis] == 0, (path, shape, spec)


def test_explicit_rules_first_match_wins_and_errors_name_the_parameter():
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    rules = ((r".*/to_[kv]_ip/.*", [None, "fsdp"]), (r"image_proj/.*", "fsdp"), (r".*", "replicated"))
    assert spec_for("unet/a/attn2/to_k_ip/0/kernel", (768, 320), rules, mesh) == P(None, "fsdp")
    assert spec_for("image_proj/proj/kernel", (1024, 3072), rules, mesh) == P(None, "fsdp")
    assert spec_for("unet/conv_in/kernel", (3, 3, 4, 320), rules, mesh) == P()
    with pytest.raises(ConfigError, match=r"splits a dimension of 30 of parameter 'unet/x/to_k_ip/0/kernel'"):
        spec_for("unet/x/to_k_ip/0/kernel", (768, 30), rules, mesh)
    with pytest.raises(ConfigError, match="No mesh rule matches parameter 'vae/x'"):
        spec_for("vae/x", (4,), rules[:1], mesh)
    with pytest.raises(ConfigError, match="'tensor' is not a mesh axis"):
        MeshConfig(rules=((".*", ["tensor"]),))


def test_placed_parameters_follow_the_rules(tiny_inputs):
    from ipadapter_jax.training.config import ModelConfig
    from ipadapter_jax.training.model import build_model

    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    model = ModelConfig(base=str(tiny_inputs["base"]), image_encoder=str(tiny_inputs["encoder"]))
    assembled = build_model(model, mesh, DEFAULT_RULES, with_encoders=False, seed=0)
    to_k = "unet/down_blocks/0/attentions/0/transformer_blocks/0/attn2/to_k/kernel"  # (32, 32)
    assert assembled.frozen[to_k].sharding.spec == P(None, "fsdp")
    ip = to_k.replace("to_k/", "to_k_ip/0/")
    assert assembled.trainable[ip].sharding.spec == P()
    assert jax.numpy.array_equal(assembled.trainable[ip], assembled.frozen[to_k])  # initialised from to_k
    assert all(k.startswith(("image_proj/", "unet/")) for k in assembled.trainable)

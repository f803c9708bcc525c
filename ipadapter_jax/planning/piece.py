"""A representative piece of the training step, small enough to compile in minutes: the UNet's first down block
with cross-attention and the up block at the same resolution (SD1.5's 64x64 level, SDXL's first attention
level), forward and backward as the step runs them (gradients of the adapter weights and of the up block's
input, the frozen weights placed by the mesh rules, the batch over every device).

bench/tpu_piece.py compares attention layouts by the compiler's estimate for this piece, a few minutes a compile
where the whole step takes half an hour on 2 cores. Everything here is abstract (`ShapeDtypeStruct`s): no
weights, no arrays.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ipadapter_jax import sharding as sharding_lib
from ipadapter_jax.models.ip_conditioning import IPConditioning
from ipadapter_jax.models.layers import IPAdapterParam, abstract_model
from ipadapter_jax.models.remat import set_remat
from ipadapter_jax.models.target import chip_of, set_target
from ipadapter_jax.models.unet import UNet2DConditionModel
from ipadapter_jax.models.unet_config import UNetConfig


@dataclasses.dataclass(frozen=True)
class PieceSettings:
    latent: int  # latent height and width of the whole image
    batch_per_chip: int
    dtype: object = jnp.bfloat16
    attention: str = "auto"
    remat: str = "none"
    num_tokens: int = 16  # image tokens of the adapter
    rules: tuple = sharding_lib.DEFAULT_RULES


def attention_level(config: UNetConfig) -> int:
    """The highest-resolution level whose down block has cross-attention."""
    return next(i for i, kind in enumerate(config.down_block_types) if kind.startswith("CrossAttn"))


def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def piece_program(config: UNetConfig, s: PieceSettings, mesh: Mesh, platform: str):
    """(jitted, abstract args): loss of the piece and its gradients, lowered under `mesh` by the caller."""
    unet = abstract_model(lambda: UNet2DConditionModel(config, num_ip_adapters=1, attention_impl=s.attention,
                                                       platform=platform, dtype=s.dtype, rngs=nnx.Rngs(0)))
    set_target(unet, platform, chip=chip_of(mesh))  # kernels and layouts as the training step has them
    level = attention_level(config)
    n = len(config.block_out_channels)
    down, up = unet.down_blocks[level], unet.up_blocks[n - 1 - level]
    set_remat(down, s.remat)
    set_remat(up, s.remat)
    graphdef, adapter, frozen = nnx.split(nnx.List([down, up]), IPAdapterParam, ...)

    def place(state):
        flat = {"/".join(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(state)}
        paths = {"/".join(map(str, path)): tuple(path) for path, _ in nnx.to_flat_state(state)}
        shardings = sharding_lib.tree_shardings({f"unet/{k}": v for k, v in flat.items()}, s.rules, mesh)
        nested: dict = {}
        for key, v in flat.items():
            node = nested
            *parents, leaf = paths[key]
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = _sds(v.shape, v.dtype, shardings[f"unet/{key}"])
        return nnx.State(nested)

    adapter, frozen = place(adapter), place(frozen)
    ch = config.block_out_channels
    b = s.batch_per_chip * mesh.size
    size = s.latent // 2 ** level
    split = NamedSharding(mesh, P(mesh.axis_names))
    replicated = NamedSharding(mesh, P())
    x_down = _sds((b, size, size, ch[level - 1] if level else ch[0]), s.dtype, split)
    skip0 = _sds((b, size, size, ch[level - 1] if level else ch[0]), s.dtype, split)
    x_up = _sds((b, size, size, ch[min(level + 1, n - 1)]), s.dtype, split)
    temb = _sds((b, config.time_embed_dim), s.dtype, split)
    context = _sds((b, 77, config.context_dim), s.dtype, split)
    tokens = _sds((b, 1, s.num_tokens, config.context_dim), s.dtype, split)
    scales = _sds((config.num_ip_layers,), jnp.float32, replicated)
    layers = config.layers_per_block[level]

    def loss(adapter, x_up, frozen, x_down, skip0, temb, context, tokens, scales):
        down_block, up_block = nnx.merge(graphdef, adapter, frozen)
        ip = IPConditioning(tokens=(tokens,), scales=(scales,), masks=(None,))
        y, skips = down_block(x_down, temb, context, ip)
        out = up_block(x_up, [skip0, *skips[:layers]], temb, context, ip, None)
        return jnp.mean(jnp.square(out.astype(jnp.float32))) + jnp.mean(y.astype(jnp.float32))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return step, (adapter, x_up, frozen, x_down, skip0, temb, context, tokens, scales)

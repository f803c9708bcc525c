"""The training step's representative piece (planning/piece.py): a tiny UNet's first cross-attention down block
and its up block, built abstractly, lowered over a data mesh of fake CPU devices: a scalar loss and gradients
for every adapter weight of both blocks and for the up block's input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.planning.piece import PieceSettings, attention_level, piece_program

TINY_UNET = {"block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1,
             "attention_head_dim": 2, "cross_attention_dim": 32, "norm_num_groups": 8, "sample_size": 16}


def test_piece_is_the_attention_level_forward_and_backward():
    config = UNetConfig.from_dict(TINY_UNET)
    assert attention_level(config) == 1
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))  # as sharding.py
    step, args = piece_program(config, PieceSettings(latent=16, batch_per_chip=1, dtype=jnp.float32,
                                                     num_tokens=4), mesh, "cpu")
    adapter, x_up = args[0], args[1]
    assert x_up.shape == (4, 8, 8, 64) and x_up.sharding.spec[0] == ("data", "fsdp")
    with jax.set_mesh(mesh):
        loss, (d_adapter, d_x_up) = jax.eval_shape(step, *args)
        step.lower(*args).compile()
    assert loss.shape == ()
    assert d_x_up.shape == x_up.shape
    leaves = jax.tree.leaves(d_adapter)
    assert len(leaves) == len(jax.tree.leaves(adapter)) >= 4  # to_k_ip and to_v_ip of each block's attention

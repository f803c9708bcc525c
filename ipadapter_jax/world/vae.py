"""The shapes world's VAE: a diffusers `AutoencoderKL` whose weights are set by hand so that it reconstructs
every world scene exactly (no training).

Latents are the scene's cells: (r, g, b, 0) in [-1, 1] per 2 x 2 block (downsampling factor 2). Every residual
branch (ResNet `conv2`, attention `to_out`) is zero, so those blocks pass their input through; the strided
downsampling convolution keeps the top-left pixel of each block and the upsampler's nearest-neighbour copy
restores it. The non-residual `GroupNorm -> SiLU -> conv` at each end is made linear: each colour channel
shares its group with its negation and with +A and -A (A large), so the group mean is exactly 0 and its
deviation is A / sqrt(2) up to a relative mean(s^2) / (2 A^2) (below 1e-6); a bias of 30 keeps SiLU on its
linear part. The posterior log-variance is -30, so encoding is deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ipadapter_jax.models.layers import abstract_model
from ipadapter_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from ipadapter_jax.weights.safetensors_io import save_safetensors
from ipadapter_jax.weights.torch_layout import flat_variables, to_torch_layout, torch_key
from ipadapter_jax.world.scenes import SIZE

_A = 1000.0  # the constant channels' magnitude
_B = 30.0  # SiLU is the identity to float32 precision above this
_CHANNELS = 12  # (s, -s, A, -A) for each of r, g, b
LATENT_CHANNELS = 4
CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.30.0",
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": LATENT_CHANNELS,
    "sample_size": SIZE,
    "block_out_channels": [_CHANNELS, _CHANNELS],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1,
    "norm_num_groups": 3,
    "act_fn": "silu",
    "scaling_factor": 1.0,  # latents are already +-1
}


def _identity_tap(out: int, inp: int, ky: int = 1, kx: int = 1) -> np.ndarray:
    w = np.zeros((out, inp, 3, 3), np.float32)
    for c in range(min(out, inp)):
        w[c, c, ky, kx] = 1.0
    return w


def _linear_in(inp: int) -> tuple[np.ndarray, np.ndarray]:
    """conv_in: colour k -> channels (s, -s) of group k, plus the constant pair (A, -A) as biases."""
    w = np.zeros((_CHANNELS, inp, 3, 3), np.float32)
    b = np.zeros((_CHANNELS,), np.float32)
    for k in range(3):
        w[4 * k, k, 1, 1], w[4 * k + 1, k, 1, 1] = 1.0, -1.0
        b[4 * k + 2], b[4 * k + 3] = _A, -_A
    return w, b


def _linear_out(out: int) -> dict[str, np.ndarray]:
    """conv_norm_out (GroupNorm made linear on the s channels, shifted by B) and conv_out (removes B)."""
    gamma = np.zeros((_CHANNELS,), np.float32)
    beta = np.zeros((_CHANNELS,), np.float32)
    w = np.zeros((out, _CHANNELS, 3, 3), np.float32)
    b = np.zeros((out,), np.float32)
    for k in range(3):
        gamma[4 * k], beta[4 * k] = _A / np.sqrt(2.0), _B
        w[k, 4 * k, 1, 1], b[k] = 1.0, -_B
    return {"conv_norm_out.weight": gamma, "conv_norm_out.bias": beta, "conv_out.weight": w, "conv_out.bias": b}


def world_vae_state() -> dict[str, np.ndarray]:
    """The VAE's PyTorch-layout state dict."""
    from flax import nnx


    model = abstract_model(lambda: AutoencoderKL(AutoencoderKLConfig.from_dict(CONFIG), rngs=nnx.Rngs(0)))
    state = {}
    for path, var in flat_variables(model).items():
        leaf = str(path[-1])
        value = np.ones(var.shape, np.float32) if leaf == "scale" else np.zeros(var.shape, np.float32)
        state[torch_key(path)] = np.ascontiguousarray(to_torch_layout(leaf, value))
    latent2 = 2 * LATENT_CHANNELS
    state["encoder.conv_in.weight"], state["encoder.conv_in.bias"] = _linear_in(3)
    state["encoder.down_blocks.0.downsamplers.0.conv.weight"] = _identity_tap(_CHANNELS, _CHANNELS, 0, 0)
    state.update({f"encoder.{k}": v for k, v in _linear_out(latent2).items()})
    state["encoder.conv_out.bias"][LATENT_CHANNELS:] = -30.0  # log-variance: a deterministic posterior
    state["quant_conv.weight"] = np.eye(latent2, dtype=np.float32)[:, :, None, None]
    state["post_quant_conv.weight"] = np.eye(LATENT_CHANNELS, dtype=np.float32)[:, :, None, None]
    state["decoder.conv_in.weight"], state["decoder.conv_in.bias"] = _linear_in(LATENT_CHANNELS)
    state["decoder.up_blocks.0.upsamplers.0.conv.weight"] = _identity_tap(_CHANNELS, _CHANNELS)
    state.update({f"decoder.{k}": v for k, v in _linear_out(3).items()})
    return state


def write_world_vae(folder: str | Path) -> Path:
    """A diffusers `vae/` folder (config.json + diffusion_pytorch_model.safetensors)."""

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(world_vae_state(), folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))
    return folder

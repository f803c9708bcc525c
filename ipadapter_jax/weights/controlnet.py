"""Load a diffusers ControlNet folder (`config.json` + `diffusion_pytorch_model[.fp16].safetensors`/`.bin`) and
check that it fits the base UNet it will steer."""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from ipadapter_jax.errors import UserError
from ipadapter_jax.models.attention import Implementation
from ipadapter_jax.models.controlnet import ControlNetModel
from ipadapter_jax.models.controlnet_config import ControlNetConfig
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.weights.pretrained import as_dtype, load_component, read_config

_EXAMPLE = {"SD1.x": " (e.g. lllyasviel/control_v11p_sd15_canny)",
            "SDXL": " (e.g. diffusers/controlnet-canny-sdxl-1.0)"}


def load_controlnet(folder: str | Path, *, dtype="float32", variant: str | None = None,
                    attention_impl: Implementation = "auto", sharding=None) -> ControlNetModel:
    """A diffusers `ControlNetModel` folder as a Flax model; every checkpoint key is consumed exactly once."""
    config = ControlNetConfig.from_dict(read_config(folder))
    dt = as_dtype(dtype)
    return load_component(
        folder, lambda: ControlNetModel(config, attention_impl=attention_impl, dtype=dt, rngs=nnx.Rngs(0)),
        basename="diffusion_pytorch_model", dtype=dt, variant=variant, what="ControlNet", sharding=sharding)


def _family(c: UNetConfig) -> str:
    """The base model family an architecture belongs to, by what tells them apart at any size."""
    if c.addition_embed_type == "text_time":
        return "SDXL"
    return "SD2.x" if c.use_linear_projection else "SD1.x"


def check_controlnet(controlnet, unet, *, name: str = "the ControlNet") -> None:
    """Raise a one-sentence `UserError` unless the ControlNet's residuals fit this UNet's skip tensors and it reads
    the same text conditioning. Either argument may be a config or a model."""
    cn: ControlNetConfig = getattr(controlnet, "config", controlnet)
    base: UNetConfig = getattr(unet, "config", unet)
    b = cn.backbone
    if _family(b) != _family(base):
        raise UserError(f"{name} was trained for {_family(b)} but the base UNet is {_family(base)}; load a "
                        f"ControlNet trained for {_family(base)}{_EXAMPLE.get(_family(base), '')}.")
    mismatched = [field for field in ("context_dim", "block_out_channels", "layers_per_block", "down_block_types",
                                      "projection_class_embeddings_input_dim", "addition_time_embed_dim")
                  if getattr(b, field) != getattr(base, field)]
    if b.in_channels != base.out_channels:
        mismatched.append(f"in_channels {b.in_channels} vs latent channels {base.out_channels}")
    if mismatched:
        raise UserError(f"{name} does not fit the base UNet ({', '.join(mismatched)} differ); load a ControlNet "
                        f"trained on this base model ({_family(base)}) or its exact architecture.")

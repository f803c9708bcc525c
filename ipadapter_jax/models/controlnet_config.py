"""A diffusers `ControlNetModel` config.json: the UNet-shaped encoder half (a `UNetConfig`) plus the fields only
a ControlNet has (the conditioning image embedding, channel order, global pooling)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ipadapter_jax.errors import ConfigError
from ipadapter_jax.models.unet_config import UNetConfig

# ControlNet-only fields this port reads; every other field is the UNet's and goes through `UNetConfig`.
_OWN = ("conditioning_channels", "conditioning_embedding_out_channels", "controlnet_conditioning_channel_order",
        "global_pool_conditions", "addition_embed_type_num_heads")
# Non-default values of these change the architecture in ways this port does not implement.
_REQUIRED: dict[str, tuple] = {"mid_block_type": ("UNetMidBlock2DCrossAttn",)}
_KNOWN_CLASSES = ("ControlNetModel",)


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    backbone: UNetConfig  # conv_in, time/added embeddings, down blocks and mid block, as in the base UNet
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    channel_order: str = "rgb"  # "bgr": the conditioning image's channels are flipped before the embedding
    global_pool_conditions: bool = False  # residuals are spatial means (the "shuffle" ControlNets)

    @property
    def num_down_residuals(self) -> int:
        """One residual per UNet skip tensor: conv_in, every down-block layer, every downsampler."""
        b = self.backbone
        return 1 + sum(b.layers_per_block) + len(b.block_out_channels) - 1

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ControlNetConfig:
        name = raw.get("_class_name", "ControlNetModel")
        if name not in _KNOWN_CLASSES:
            raise ConfigError(f"config _class_name={name!r} is not a ControlNetModel; this port loads diffusers "
                              "ControlNetModel folders (SD1.x, SD2.x and SDXL ControlNets).")
        for field, supported in _REQUIRED.items():
            if field in raw and raw[field] not in supported:
                raise ConfigError(f"ControlNet config field {field}={raw[field]!r} is not supported "
                                  f"(supported: {supported[0]!r}).")
        order = raw.get("controlnet_conditioning_channel_order", "rgb")
        if order not in ("rgb", "bgr"):
            raise ConfigError(f"ControlNet config field controlnet_conditioning_channel_order={order!r} is not "
                              "supported (supported: 'rgb', 'bgr').")
        embedding = raw.get("conditioning_embedding_out_channels", cls.conditioning_embedding_out_channels)
        if not embedding:
            raise ConfigError("ControlNet config field conditioning_embedding_out_channels must list at least "
                              "one width.")
        if raw.get("layers_per_block") is not None and not isinstance(raw["layers_per_block"], int):
            raise ConfigError("ControlNet config field layers_per_block must be one integer, as diffusers reads it.")
        unet_fields = {k: v for k, v in raw.items() if k not in _OWN}
        down = unet_fields.get("down_block_types", UNetConfig.down_block_types)
        # A ControlNet has no up path; mirror the down path so the UNet config validates.
        unet_fields["up_block_types"] = [t.replace("Down", "Up") for t in reversed(down)]
        unet_fields["mid_block_type"] = "UNetMidBlock2DCrossAttn"
        unet_fields.setdefault("cross_attention_dim", 1280)  # ControlNetModel's default, as the UNet's
        try:
            backbone = UNetConfig.from_dict(unet_fields)
        except ConfigError as e:
            raise ConfigError(str(e).replace("UNet config", "ControlNet config", 1)) from None
        return cls(
            backbone=backbone,
            conditioning_channels=int(raw.get("conditioning_channels", 3)),
            conditioning_embedding_out_channels=tuple(embedding),
            channel_order=order,
            global_pool_conditions=bool(raw.get("global_pool_conditions", False)),
        )

"""`UNet2DConditionModel` architecture read from a diffusers `config.json`, with per-block lists resolved."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ipadapter_jax.errors import ConfigError

_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")

# Fields whose non-default values change the architecture in ways this port does not implement.
_REQUIRED: dict[str, tuple] = {
    "class_embed_type": (None,), "num_class_embeds": (None,), "encoder_hid_dim_type": (None,),
    "encoder_hid_dim": (None,), "time_embedding_type": ("positional",), "time_cond_proj_dim": (None,),
    "resnet_time_scale_shift": ("default",), "dual_cross_attention": (False,), "attention_type": ("default",),
    "center_input_sample": (False,), "timestep_post_act": (None,), "time_embedding_act_fn": (None,),
    "class_embeddings_concat": (False,), "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1.0,),
    "cross_attention_norm": (None,), "mid_block_only_cross_attention": (None, False),
    "num_attention_heads": (None,), "act_fn": ("silu",), "reverse_transformer_layers_per_block": (None,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "time_embedding_dim": (None,),
}


def _per_block(value, n: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"UNet config field {name!r} has {len(value)} entries for {n} blocks.")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    heads: tuple[int, ...] = (8, 8, 8, 8)  # diffusers' legacy `attention_head_dim` is the head count
    cross_attention_dim: tuple[int, ...] = (768, 768, 768, 768)
    only_cross_attention: tuple[bool, ...] = (False, False, False, False)
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    addition_embed_type: str | None = None  # None or "text_time" (SDXL)
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def context_dim(self) -> int:
        return self.cross_attention_dim[-1]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> UNetConfig:
        for name, supported in _REQUIRED.items():
            if name in raw and raw[name] not in supported:
                raise ConfigError(
                    f"UNet config field {name}={raw[name]!r} is not supported (supported: {supported[0]!r})."
                )
        down = tuple(raw.get("down_block_types", cls.down_block_types))
        up = tuple(raw.get("up_block_types", cls.up_block_types))
        for t in down:
            if t not in _DOWN:
                raise ConfigError(f"UNet config field down_block_types has unsupported block {t!r}.")
        for t in up:
            if t not in _UP:
                raise ConfigError(f"UNet config field up_block_types has unsupported block {t!r}.")
        n = len(down)
        addition = raw.get("addition_embed_type")
        if addition not in (None, "text_time"):
            raise ConfigError(f"UNet config field addition_embed_type={addition!r} is not supported.")
        if raw.get("conv_in_kernel", 3) % 2 == 0 or raw.get("conv_out_kernel", 3) % 2 == 0:
            raise ConfigError("UNet config fields conv_in_kernel/conv_out_kernel must be odd.")
        return cls(
            in_channels=raw.get("in_channels", 4),
            out_channels=raw.get("out_channels", 4),
            sample_size=raw.get("sample_size") or 64,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=tuple(raw.get("block_out_channels", cls.block_out_channels)),
            layers_per_block=_per_block(raw.get("layers_per_block", 2), n, "layers_per_block"),
            transformer_layers_per_block=_per_block(raw.get("transformer_layers_per_block", 1), n,
                                                    "transformer_layers_per_block"),
            heads=_per_block(raw.get("attention_head_dim", 8), n, "attention_head_dim"),
            cross_attention_dim=_per_block(raw.get("cross_attention_dim", 1280), n, "cross_attention_dim"),
            only_cross_attention=_per_block(raw.get("only_cross_attention", False), n, "only_cross_attention"),
            use_linear_projection=bool(raw.get("use_linear_projection", False)),
            upcast_attention=bool(raw.get("upcast_attention", False)),
            norm_num_groups=raw.get("norm_num_groups", 32),
            norm_eps=raw.get("norm_eps", 1e-5),
            flip_sin_to_cos=raw.get("flip_sin_to_cos", True),
            freq_shift=raw.get("freq_shift", 0),
            conv_in_kernel=raw.get("conv_in_kernel", 3),
            conv_out_kernel=raw.get("conv_out_kernel", 3),
            downsample_padding=raw.get("downsample_padding", 1),
            mid_block_scale_factor=raw.get("mid_block_scale_factor", 1.0),
            addition_embed_type=addition,
            addition_time_embed_dim=raw.get("addition_time_embed_dim"),
            projection_class_embeddings_input_dim=raw.get("projection_class_embeddings_input_dim"),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> UNetConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist; a diffusers UNet folder holds config.json.") from None
        except ValueError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}).") from None
        return cls.from_dict(raw)

    def cross_attention_layers(self) -> list[str]:
        """Paths of every `attn2`, in the official IP-Adapter numbering order (down, up, mid)."""
        paths = []
        for i, t in enumerate(self.down_block_types):
            if t.startswith("CrossAttn"):
                for j in range(self.layers_per_block[i]):
                    for k in range(self.transformer_layers_per_block[i]):
                        paths.append(f"down_blocks.{i}.attentions.{j}.transformer_blocks.{k}.attn2")
        rev_layers = self.layers_per_block[::-1]
        rev_tlayers = self.transformer_layers_per_block[::-1]
        for i, t in enumerate(self.up_block_types):
            if t.startswith("CrossAttn"):
                for j in range(rev_layers[i] + 1):
                    for k in range(rev_tlayers[i]):
                        paths.append(f"up_blocks.{i}.attentions.{j}.transformer_blocks.{k}.attn2")
        for k in range(self.transformer_layers_per_block[-1]):
            paths.append(f"mid_block.attentions.0.transformer_blocks.{k}.attn2")
        return paths

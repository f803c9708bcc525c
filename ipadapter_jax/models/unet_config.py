"""`UNet2DConditionModel` architecture read from a diffusers `config.json`, with per-block lists resolved; the
order of its cross-attention layers (the one definition the UNet, the adapter layout and the per-block scales
use); and the standard SD1.5 / SD2.x / SDXL UNets."""

from __future__ import annotations

import dataclasses
import functools
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

    @functools.cache  # noqa: B019 (frozen, hashable configs: one list per architecture)
    def cross_attention_layers(self) -> tuple[CrossAttentionLayer, ...]:
        """Every `attn2`, in the official IP-Adapter numbering order: down blocks, then up blocks, then the mid
        block (the order of diffusers' `attn_processors`). Layer i is `ip_adapter.<2i+1>` in official files."""
        channels = self.block_out_channels
        rev_layers, rev_tlayers = self.layers_per_block[::-1], self.transformer_layers_per_block[::-1]
        blocks = [("down", i, self.layers_per_block[i], self.transformer_layers_per_block[i], channels[i])
                  for i, t in enumerate(self.down_block_types) if t.startswith("CrossAttn")]
        blocks += [("up", i, rev_layers[i] + 1, rev_tlayers[i], channels[::-1][i])
                   for i, t in enumerate(self.up_block_types) if t.startswith("CrossAttn")]
        blocks.append(("mid", 0, 1, self.transformer_layers_per_block[-1], channels[-1]))
        return tuple(CrossAttentionLayer(side, block, j, k, width)
                     for side, block, attentions, transformers, width in blocks
                     for j in range(attentions) for k in range(transformers))

    @property
    def num_ip_layers(self) -> int:
        return len(self.cross_attention_layers())

    def ip_layer_index(self, prefix: str, num_attentions: int) -> tuple[tuple[int, ...], ...]:
        """For the block at `prefix` (e.g. "down_blocks.1") with `num_attentions` attentions: the official index of
        each attention's transformer layers, [attention][transformer] (an attention may hold none)."""
        rows: dict[int, list[int]] = {}
        for i, layer in enumerate(self.cross_attention_layers()):
            if layer.block_path == prefix:
                rows.setdefault(layer.attention, []).append(i)
        return tuple(tuple(rows.get(j, ())) for j in range(num_attentions))


@dataclasses.dataclass(frozen=True)
class CrossAttentionLayer:
    """One `attn2`: `<side>_blocks.<block>.attentions.<attention>.transformer_blocks.<transformer>.attn2`
    (`mid_block.attentions.0...` for the mid block), with the width of its hidden states."""

    side: str  # "down", "mid" or "up"
    block: int
    attention: int
    transformer: int
    hidden_size: int

    @property
    def block_path(self) -> str:
        return "mid_block" if self.side == "mid" else f"{self.side}_blocks.{self.block}"

    @property
    def path(self) -> str:
        return f"{self.block_path}.attentions.{self.attention}.transformer_blocks.{self.transformer}.attn2"


_SDXL_BLOCKS = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
STANDARD_BASES: dict[str, UNetConfig] = {
    "sd15": UNetConfig(),
    "sd2": UNetConfig(heads=(5, 10, 20, 20), cross_attention_dim=(1024,) * 4, use_linear_projection=True),
    "sdxl": UNetConfig(block_out_channels=(320, 640, 1280), layers_per_block=(2, 2, 2),
                       transformer_layers_per_block=(1, 2, 10), heads=(5, 10, 20), cross_attention_dim=(2048,) * 3,
                       only_cross_attention=(False,) * 3, use_linear_projection=True,
                       addition_embed_type="text_time", addition_time_embed_dim=256,
                       projection_class_embeddings_input_dim=2816, **_SDXL_BLOCKS),
}
BASE_NAMES = {"sd15": "SD1.5", "sd2": "SD2.x", "sdxl": "SDXL"}
_ALIASES = {"sd15": "sd15", "sd1": "sd15", "sd2": "sd2", "sd2x": "sd2", "sd21": "sd2", "sdxl": "sdxl"}


def standard_base(name: str) -> UNetConfig | None:
    """The standard UNet called `name` (sd15, sd1.5, sd2, sd21, sdxl, ...), or None."""
    key = _ALIASES.get(name.lower().replace(".", "").replace("-", "").replace("_", ""))
    return STANDARD_BASES[key] if key else None


def base_name(cross_attention_dim: int, num_layers: int) -> str | None:
    """"SD1.5", "SD2.x" or "SDXL" for a standard (cross width, layer count), else None."""
    for key, config in STANDARD_BASES.items():
        if config.context_dim == cross_attention_dim and config.num_ip_layers == num_layers:
            return BASE_NAMES[key]
    return None

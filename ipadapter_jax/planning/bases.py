"""Architecture facts of a base model for planning, with no weights read: from a diffusers folder's configs,
a hub id whose configs are cached or reachable, or the built-in SD1.5 / SD2.1 / SDXL configs (offline)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ipadapter_jax.errors import UserError
from ipadapter_jax.models.clip_vision import CLIPVisionConfig
from ipadapter_jax.models.unet_config import STANDARD_BASES, UNetConfig

_SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                 "num_train_timesteps": 1000, "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}
# The image encoders IP-Adapter ships: ViT-H/14 (models/image_encoder) and ViT-bigG/14 (sdxl_models/image_encoder).
VIT_H = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                         hidden_act="gelu", projection_dim=1024, image_size=224, patch_size=14)
VIT_BIGG = CLIPVisionConfig(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48,
                            num_attention_heads=16, hidden_act="gelu", projection_dim=1280, image_size=224,
                            patch_size=14)


@dataclasses.dataclass(frozen=True)
class BaseArchitecture:
    name: str
    unet: UNetConfig
    scheduler: dict[str, Any]
    latent_channels: int = 4
    vae_scale_factor: int = 8
    text_length: int = 77
    pooled_dim: int | None = None  # SDXL's pooled text embedding
    vae_scaling_factor: float = 0.18215

    @property
    def is_xl(self) -> bool:
        return self.unet.addition_embed_type == "text_time"

    @property
    def prediction_type(self) -> str:
        return self.scheduler.get("prediction_type", "epsilon")


BUILT_IN: dict[str, BaseArchitecture] = {
    "sd15": BaseArchitecture("sd15", STANDARD_BASES["sd15"], {**_SD_SCHEDULER, "_class_name": "PNDMScheduler"}),
    "sd21": BaseArchitecture("sd21", dataclasses.replace(STANDARD_BASES["sd2"], sample_size=96),
                             {**_SD_SCHEDULER, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}),
    "sdxl": BaseArchitecture("sdxl", dataclasses.replace(STANDARD_BASES["sdxl"], sample_size=128),
                             {**_SD_SCHEDULER, "_class_name": "EulerDiscreteScheduler"}, pooled_dim=1280,
                             vae_scaling_factor=0.13025),
}
_HUB_IDS = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15", "runwayml/stable-diffusion-v1-5": "sd15",
            "compvis/stable-diffusion-v1-4": "sd15", "stabilityai/stable-diffusion-2-1": "sd21",
            "stabilityai/stable-diffusion-xl-base-1.0": "sdxl"}
_ALIASES = {"sd15": "sd15", "sd1.5": "sd15", "sd21": "sd21", "sd2": "sd21", "sdxl": "sdxl"}


def _read(folder: Path, name: str) -> dict[str, Any]:
    return json.loads((folder / name).read_text())


def _from_folder(folder: Path, name: str) -> BaseArchitecture:
    unet = UNetConfig.from_dict(_read(folder, "unet/config.json"))
    scheduler = _read(folder, "scheduler/scheduler_config.json")
    vae = _read(folder, "vae/config.json") if (folder / "vae/config.json").is_file() else {}
    pooled = None
    if unet.addition_embed_type == "text_time":
        pooled = _read(folder, "text_encoder_2/config.json").get("projection_dim", 1280)
    return BaseArchitecture(name, unet, scheduler, latent_channels=vae.get("latent_channels", 4),
                            vae_scale_factor=2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1),
                            pooled_dim=pooled, vae_scaling_factor=vae.get("scaling_factor", 0.18215))


def base_architecture(base: str) -> BaseArchitecture:
    """sd15 / sd21 / sdxl, a diffusers pipeline folder, or a hub id (its cached configs, else a built-in one)."""
    key = _ALIASES.get(base.lower())
    if key:
        return BUILT_IN[key]
    folder = Path(base).expanduser()
    if (folder / "unet" / "config.json").is_file():
        return _from_folder(folder, str(folder))
    if "/" in base and not folder.exists():
        try:
            from huggingface_hub import snapshot_download

            cached = Path(snapshot_download(base, allow_patterns=["*.json"], local_files_only=True))
            if (cached / "unet" / "config.json").is_file():
                return _from_folder(cached, base)
        except Exception:  # noqa: BLE001 - offline or not cached: the built-in config of a known id
            pass
        if base.lower() in _HUB_IDS:
            return BUILT_IN[_HUB_IDS[base.lower()]]
    raise UserError(f"base {base!r} is neither sd15, sd21 or sdxl, a diffusers folder with unet/config.json, "
                    f"nor a known or cached hub id ({', '.join(_HUB_IDS)}).")


def image_encoder_config(path: str | None, base: BaseArchitecture) -> CLIPVisionConfig:
    """The image encoder's config from its folder, else ViT-H (the encoder of most IP-Adapters, SDXL included)."""
    if path and (Path(path) / "config.json").is_file():
        return CLIPVisionConfig.from_dict(_read(Path(path), "config.json"))
    if path and "sdxl_models" in path:
        return VIT_BIGG
    return VIT_H

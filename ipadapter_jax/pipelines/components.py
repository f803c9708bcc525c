"""Load a Stable Diffusion base (SD1.x, SD2.x, SDXL, inpainting) from a diffusers folder or a hub id."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ipadapter_jax.data.transforms import load_tokenizer
from ipadapter_jax.errors import UserError
from ipadapter_jax.models.attention import Implementation
from ipadapter_jax.models.clip_text import CLIPTextModel
from ipadapter_jax.models.controlnet import ControlNetModel
from ipadapter_jax.models.controlnet_config import ControlNetConfig
from ipadapter_jax.models.unet import UNet2DConditionModel
from ipadapter_jax.models.vae import AutoencoderKL
from ipadapter_jax.schedulers import Scheduler, load_scheduler
from ipadapter_jax.weights.controlnet import check_controlnet, load_controlnet
from ipadapter_jax.weights.converted import ConvertedWeights
from ipadapter_jax.weights.diffusers_models import load_text_encoder, load_unet, load_vae
from ipadapter_jax.weights.hub import resolve, resolve_path
from ipadapter_jax.weights.pretrained import read_config

_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2")


@dataclasses.dataclass
class BaseModels:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: tuple[CLIPTextModel, ...]  # one for SD1/SD2, two for SDXL
    tokenizers: tuple[Any, ...]
    scheduler: Scheduler
    scheduler_config: dict
    folder: Path
    force_zeros_for_empty_prompt: bool = False

    @property
    def is_xl(self) -> bool:
        return self.unet.config.addition_embed_type == "text_time"

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.vae_scale_factor

    @property
    def default_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor


def load_base(base: str | Path, *, dtype="float32", variant: str | None = None, num_ip_adapters: int = 0,
              attention_impl: Implementation = "auto", scheduler: str | None = None,
              revision: str | None = None, sharding=None, cache: ConvertedWeights | None = None) -> BaseModels:
    """Every component of a diffusers pipeline folder (or hub id) that image-prompted generation needs.

    `scheduler` overrides the folder's scheduler class by name (ddim, pndm, euler, euler_ancestral,
    dpmpp_2m, dpmpp_2m_karras), keeping its config as diffusers' `from_config` does.
    """
    folder = resolve(base, subfolders=_SUBFOLDERS, variant=variant, revision=revision, what="base model")
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    if not (folder / "unet").is_dir():
        raise UserError(f"{folder} is not a diffusers pipeline folder (no unet/ subfolder); pass the folder that "
                        "holds model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/.")
    unet = load_unet(folder / "unet", dtype=dtype, variant=variant, num_ip_adapters=num_ip_adapters,
                     attention_impl=attention_impl, sharding=sharding, cache=cache)
    vae = load_vae(folder / "vae", dtype=dtype, variant=variant, attention_impl=attention_impl, sharding=sharding,
                   cache=cache)
    names = ["text_encoder", "text_encoder_2"] if (folder / "text_encoder_2").is_dir() else ["text_encoder"]
    encoders = tuple(load_text_encoder(folder / n, dtype=dtype, variant=variant, attention_impl=attention_impl,
                                       sharding=sharding, cache=cache) for n in names)
    tokenizers = tuple(load_tokenizer(str(folder / n.replace("text_encoder", "tokenizer"))) for n in names)
    xl = unet.config.addition_embed_type == "text_time"
    if xl and len(encoders) != 2:
        raise UserError(f"{folder} has an SDXL UNet but no text_encoder_2/; the base model folder is incomplete.")
    sched = load_scheduler(folder / "scheduler", name=scheduler)
    sched_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return BaseModels(unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers, scheduler=sched,
                      scheduler_config=sched_config, folder=folder,
                      force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", xl)))


def load_controlnets(specs, unet: UNet2DConditionModel, *, dtype="float32", attention_impl: Implementation = "auto",
                     sharding=None) -> tuple[list[Path], list[ControlNetModel]]:
    """ControlNet folders (local, a hub repo id such as lllyasviel/control_v11p_sd15_canny, or owner/repo/folder),
    each checked against `unet` from its config before its weights load. Returns (folders, models)."""
    folders, models = [], []
    for k, spec in enumerate(specs):
        name = "the ControlNet" if len(specs) == 1 else f"ControlNet {k + 1} of {len(specs)} ({spec})"
        local = Path(spec).expanduser().exists() or len(str(spec).split("/")) != 2
        folder = resolve_path(spec, what="ControlNet") if local else resolve(spec, what="ControlNet")
        check_controlnet(ControlNetConfig.from_dict(read_config(folder)), unet, name=name)
        folders.append(folder)
        models.append(load_controlnet(folder, dtype=dtype, attention_impl=attention_impl, sharding=sharding))
    return folders, models

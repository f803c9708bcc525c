"""Loaders of the diffusers / transformers models this project owns in Flax: each builds the model abstractly
from its folder's `config.json` and fills it from the folder's weights (every checkpoint key consumed exactly
once), with the key policies that reach our module paths from each library's checkpoint names.

    load_unet           diffusers `unet/` -> UNet2DConditionModel (IP-Adapter slots start as copies of to_k/to_v)
    load_vae            diffusers `vae/` -> AutoencoderKL (legacy attention names, 1x1-conv projections)
    load_text_encoder   transformers CLIP text encoder, with or without projection (a CLIPModel folder too)
    load_image_encoder  transformers CLIPVisionModelWithProjection (a CLIPModel folder too)
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import numpy as np
from flax import nnx

from ipadapter_jax.models.attention import Implementation
from ipadapter_jax.models.clip_encoder import tower_config
from ipadapter_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from ipadapter_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection
from ipadapter_jax.models.layers import IPAdapterParam, abstract_model
from ipadapter_jax.models.unet import UNet2DConditionModel, init_ip_from_text
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from ipadapter_jax.weights.checkpoint_files import open_weights
from ipadapter_jax.weights.converted import ConvertedWeights
from ipadapter_jax.weights.pretrained import as_dtype, load_component, read_config
from ipadapter_jax.weights.torch_layout import KeyPolicy, load_state

# ------------------------------------------------------------------------------------------------------ UNet


def load_unet(folder, *, dtype="float32", num_ip_adapters: int = 0, attention_impl: Implementation = "auto",
              platform: str | None = None, variant: str | None = None, sharding=None,
              cache: ConvertedWeights | None = None) -> UNet2DConditionModel:
    """A diffusers `unet/` folder as a Flax UNet; IP-Adapter slots start as copies of `to_k`/`to_v`."""

    config = UNetConfig.from_dict(read_config(folder))
    dt = as_dtype(dtype)
    unet = load_component(
        folder,
        lambda: UNet2DConditionModel(config, num_ip_adapters=num_ip_adapters, attention_impl=attention_impl,
                                     platform=platform, dtype=dt, rngs=nnx.Rngs(0)),
        basename="diffusion_pytorch_model", dtype=dt, variant=variant, what="UNet", sharding=sharding,
        exclude=IPAdapterParam, cache=cache)
    init_ip_from_text(unet)
    return unet


# ------------------------------------------------------------------------------------------------------- VAE

# Checkpoints saved before diffusers renamed the VAE attention (query/key/value/proj_attn), sometimes with
# those projections stored as 1x1 convolutions [C, C, 1, 1].
_OLD_ATTENTION = re.compile(r"^((?:en|de)coder\.mid_block\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_NEW_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTENTION_WEIGHT = re.compile(
    r"^(?:en|de)coder\.mid_block\.attentions\.\d+\.(?:query|key|value|proj_attn|to_q|to_k|to_v|to_out\.0)\.weight$")


def _rename_legacy(key: str) -> str:
    return _OLD_ATTENTION.sub(lambda m: m.group(1) + _NEW_NAMES[m.group(2)] + ".", key)


VAE_KEY_POLICY = KeyPolicy(rename=_rename_legacy)


class _LinearAttentionWeights(Mapping[str, np.ndarray]):
    """A state dict whose 1x1-conv attention projections read as linear [out, in] weights."""

    def __init__(self, state_dict: Mapping[str, np.ndarray]):
        self._base = state_dict
        self.files = getattr(state_dict, "files", ())

    def __getitem__(self, key: str) -> np.ndarray:
        array = self._base[key]
        if array.ndim == 4 and array.shape[2:] == (1, 1) and _ATTENTION_WEIGHT.match(key):
            return array[:, :, 0, 0]
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)


def load_vae(folder, *, dtype="float32", variant: str | None = None, attention_impl: Implementation = "auto",
             platform: str | None = None, sharding=None, cache: ConvertedWeights | None = None) -> AutoencoderKL:
    """A diffusers `vae/` folder as a Flax `AutoencoderKL`, computing in `dtype`."""

    config = AutoencoderKLConfig.from_dict(read_config(folder))
    dt = as_dtype(dtype)
    abstract = abstract_model(lambda: AutoencoderKL(config, attention_impl=attention_impl, platform=platform,
                                                    dtype=dt, rngs=nnx.Rngs(0)))
    weights = open_weights(folder, "diffusion_pytorch_model", variant)
    return load_state(abstract, _LinearAttentionWeights(weights), dtype=dt, policy=VAE_KEY_POLICY, what="VAE",
                      source=weights.description, sharding=sharding, cache=cache)


# ------------------------------------------------------------------------------------------------------ CLIP


def tower_policy(tower: str, projection: str, ignore: list[str]):
    """How a tower's checkpoint keys reach our paths: transformers 5 saves a bare `CLIPTextModel` (or
    `CLIPVisionModel`) without the `text_model.` prefix that older files and the projection models carry."""

    def rename(key: str) -> str:
        return key if key.startswith((f"{tower}.", f"{projection}.")) else f"{tower}.{key}"

    return KeyPolicy(rename=rename, ignore=(rf"({tower}\.)?embeddings\.position_ids", *ignore))


def load_text_encoder(folder, *, dtype="float32", variant: str | None = None,
                      with_projection: bool | None = None, attention_impl: Implementation = "auto",
                      sharding=None, cache: ConvertedWeights | None = None) -> CLIPTextModel:
    """A transformers text encoder folder (`config.json` + `model.safetensors`/`.bin`) as a Flax model.

    `with_projection=None` builds `CLIPTextModelWithProjection` when the config's `architectures` names it or
    the checkpoint holds `text_projection.weight`; `False` drops a checkpoint's projection on purpose.
    """

    raw = read_config(folder)
    config = CLIPTextConfig.from_dict(raw)
    _, full = tower_config(raw, "text_config")
    weights = open_weights(folder, "model", variant)
    if with_projection is None:
        with_projection = ("CLIPTextModelWithProjection" in (raw.get("architectures") or ())
                           or "text_projection.weight" in weights)
    ignore = [] if with_projection else [r"text_projection\.weight"]
    if full:  # a whole CLIPModel checkpoint: the image tower is not ours to load
        ignore += [r"vision_model\..*", r"visual_projection\.weight", r"logit_scale"]
    dt = as_dtype(dtype)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    abstract = abstract_model(lambda: cls(config, attention_impl=attention_impl, dtype=dt, rngs=nnx.Rngs(0)))
    policy = tower_policy("text_model", "text_projection", ignore)
    return load_state(abstract, weights, dtype=dt, policy=policy, what="CLIP text encoder",
                      source=weights.description, sharding=sharding, cache=cache)


def load_image_encoder(folder, *, dtype="float32", variant: str | None = None,
                       attention_impl: Implementation = "auto", sharding=None,
                       cache: ConvertedWeights | None = None) -> CLIPVisionModelWithProjection:
    """An IP-Adapter `image_encoder` folder (transformers `CLIPVisionModelWithProjection`) as a Flax model.

    A full `CLIPModel` folder also works: its text tower and `logit_scale` are skipped.
    """

    raw = read_config(folder)
    config = CLIPVisionConfig.from_dict(raw)
    _, full = tower_config(raw, "vision_config")
    ignore = [r"text_model\..*", r"text_projection\.weight", r"logit_scale"] if full else []
    dt = as_dtype(dtype)
    build = lambda: CLIPVisionModelWithProjection(config, attention_impl=attention_impl, dtype=dt,  # noqa: E731
                                                  rngs=nnx.Rngs(0))
    return load_component(folder, build, basename="model", dtype=dt, variant=variant,
                          policy=tower_policy("vision_model", "visual_projection", ignore),
                          what="CLIP image encoder", sharding=sharding, cache=cache)

"""The model a training run holds: the frozen base (UNet, VAE, text and image encoders, any dtype) with the
trainable adapter (image projection + every ``to_k_ip``/``to_v_ip``), each parameter placed by the mesh rules.

Trainable weights are exactly the ``IPAdapterParam`` variables; everything else is frozen. Parameters are
handled as flat ``{path: array}`` dicts (``unet/.../attn2/to_k_ip/0/kernel``) so that mesh rules, optimizer
state and checkpoints all speak the same paths.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ipadapter_jax import sharding as sharding_lib
from ipadapter_jax.errors import ConfigError, UserError
from ipadapter_jax.ip_adapter import IPAdapter
from ipadapter_jax.models.adapter_spec import AdapterSpec, make_spec
from ipadapter_jax.models.clip_text import CLIPTextModel
from ipadapter_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection
from ipadapter_jax.models.image_proj import build_image_proj
from ipadapter_jax.models.layers import IPAdapterParam, abstract_model
from ipadapter_jax.models.remat import set_remat
from ipadapter_jax.models.target import chip_of, platform_of, set_target
from ipadapter_jax.models.unet import UNet2DConditionModel
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from ipadapter_jax.schedulers import alphas_cumprod_for_config
from ipadapter_jax.training.config import ModelConfig
from ipadapter_jax.weights.diffusers_models import load_image_encoder, load_text_encoder, load_unet, load_vae
from ipadapter_jax.weights.pretrained import as_dtype, read_config

Flat = dict[str, jax.Array]


class TrainModel(nnx.Module):
    """The frozen base and the adapter. Encoders are None when training reads the encoder cache."""

    def __init__(self, unet: UNet2DConditionModel, image_proj: nnx.Module, *, vae: AutoencoderKL | None = None,
                 text_encoders: tuple[CLIPTextModel, ...] = (),
                 image_encoder: CLIPVisionModelWithProjection | None = None):
        self.unet = unet
        self.image_proj = image_proj
        self.vae = vae
        self.text_encoders = nnx.List(list(text_encoders))
        self.image_encoder = image_encoder


@dataclasses.dataclass(frozen=True)
class BaseInfo:
    """Static facts of the base model the step needs (never traced)."""

    folder: Path
    unet_config: UNetConfig
    is_xl: bool
    alphas_cumprod: np.ndarray  # float32 (num_train_timesteps,)
    prediction_type: str  # the scheduler config's
    vae_scaling: dict[str, Any]  # scale_latents keyword arguments
    latent_channels: int
    vae_scale_factor: int
    tokenizer_paths: tuple[str, ...]
    unet_dtype: Any

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])


def read_base_info(folder: str | Path, dtype: str) -> BaseInfo:
    folder = Path(folder)
    if not (folder / "unet").is_dir():
        raise UserError(f"{folder} is not a diffusers pipeline folder (no unet/); set model.base to the "
                        "folder holding unet/, vae/, text_encoder/, tokenizer/ and scheduler/.")
    unet_config = UNetConfig.from_dict(read_config(folder / "unet"))
    vae_config = AutoencoderKLConfig.from_dict(read_config(folder / "vae"))
    scheduler = read_config(folder / "scheduler", "scheduler_config.json")
    is_xl = unet_config.addition_embed_type == "text_time"
    names = ("tokenizer", "tokenizer_2") if is_xl else ("tokenizer",)
    for name in names:
        if not (folder / name).is_dir():
            raise UserError(f"{folder} has no {name}/ folder; the base model folder is incomplete.")
    return BaseInfo(
        folder=folder, unet_config=unet_config, is_xl=is_xl, alphas_cumprod=alphas_cumprod_for_config(scheduler),
        prediction_type=scheduler.get("prediction_type", "epsilon"),
        vae_scaling=dict(scaling_factor=vae_config.scaling_factor, shift_factor=vae_config.shift_factor,
                         latents_mean=vae_config.latents_mean, latents_std=vae_config.latents_std),
        latent_channels=vae_config.latent_channels, vae_scale_factor=2 ** (len(vae_config.block_out_channels) - 1),
        tokenizer_paths=tuple(str(folder / n) for n in names), unet_dtype=as_dtype(dtype))


def adapter_spec(config: ModelConfig, unet_config: UNetConfig, encoder_config: CLIPVisionConfig) -> AdapterSpec:
    """The spec of the adapter to train: the official recipe's classes and sizes (``make_spec``), with the
    config's token count and resampler overrides."""
    base = config.variant == "base"
    spec = make_spec(config.variant, unet_config,
                     image_feature_dim=encoder_config.projection_dim if base else encoder_config.hidden_size,
                     num_tokens=encoder_config.num_positions if config.variant == "full" else config.num_tokens,
                     name="trained with ipadapter_jax")
    if spec.resampler is not None:
        r = spec.resampler
        spec = dataclasses.replace(spec, resampler=dataclasses.replace(
            r, dim=config.resampler_dim or r.dim, heads=config.resampler_heads or r.heads,
            depth=config.resampler_depth))
    return spec


def flat_paths(state: nnx.State) -> dict[str, tuple]:
    return {"/".join(map(str, path)): tuple(path) for path, _ in nnx.to_flat_state(state)}


def flatten(state: nnx.State) -> Flat:
    return {"/".join(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(state)}


def unflatten(flat: Mapping[str, Any], paths: Mapping[str, tuple]) -> nnx.State:
    """A pure (array-leaved) ``nnx.State`` from a flat dict, ready for ``nnx.merge``."""
    nested: dict = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = paths[key]
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nnx.State(nested)


@dataclasses.dataclass
class Assembled:
    """A split ``TrainModel``: ``nnx.merge(graphdef, unflatten(trainable), unflatten(frozen))`` rebuilds it."""

    graphdef: Any
    trainable: Flat
    frozen: Flat
    trainable_paths: dict[str, tuple]
    frozen_paths: dict[str, tuple]
    spec: AdapterSpec
    info: BaseInfo
    image_size: int  # the image encoder's input size

    def merge(self, trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> TrainModel:
        return nnx.merge(self.graphdef, unflatten(trainable, self.trainable_paths),
                         unflatten(frozen, self.frozen_paths))


class Encoders(nnx.Module):
    """The frozen encoders alone (building an encoder cache, sampling in a cached run)."""

    def __init__(self, vae: AutoencoderKL, text_encoders: tuple[CLIPTextModel, ...],
                 image_encoder: CLIPVisionModelWithProjection):
        self.vae = vae
        self.text_encoders = nnx.List(list(text_encoders))
        self.image_encoder = image_encoder


def read_encoder_config(config: ModelConfig) -> CLIPVisionConfig:
    if not config.image_encoder or not Path(config.image_encoder).is_dir():
        raise UserError(f"model.image_encoder {config.image_encoder!r} is not a folder; pass the CLIP image "
                        "encoder folder (config.json + model.safetensors).")
    return CLIPVisionConfig.from_dict(read_config(config.image_encoder))


def load_encoders(config: ModelConfig, info: BaseInfo, mesh: Mesh, rules) -> Encoders:
    """The VAE, text encoder(s) and image encoder, each parameter placed by ``rules``."""
    wv = config.weights_variant
    vae = load_vae(info.folder / "vae", dtype=config.vae_dtype or config.dtype, variant=wv,
                   attention_impl=config.attention, sharding=sharding_lib.placer(mesh, rules, "vae/"))
    names = ("text_encoder", "text_encoder_2") if info.is_xl else ("text_encoder",)
    text_encoders = tuple(
        load_text_encoder(info.folder / n, dtype=config.dtype, variant=wv,
                          with_projection=True if n == "text_encoder_2" else None,
                          attention_impl=config.attention,
                          sharding=sharding_lib.placer(mesh, rules, f"text_encoders/{i}/"))
        for i, n in enumerate(names))
    image_encoder = load_image_encoder(config.image_encoder, dtype=config.dtype, attention_impl=config.attention,
                                       sharding=sharding_lib.placer(mesh, rules, "image_encoder/"))
    encoders = Encoders(vae, text_encoders, image_encoder)
    set_target(encoders, platform_of(mesh), chip=chip_of(mesh))
    return encoders


def build_model(config: ModelConfig, mesh: Mesh, rules, *, with_encoders: bool, seed: int) -> Assembled:
    """Load the base with each frozen parameter placed by ``rules``; build the adapter already sharded.

    ``with_encoders=False`` (encoder cache) loads only the UNet; the VAE and encoders stay on disk.
    """
    info = read_base_info(config.base, config.dtype)
    encoder_config = read_encoder_config(config)
    spec = adapter_spec(config, info.unet_config, encoder_config)
    unet = load_unet(info.folder / "unet", dtype=config.dtype, variant=config.weights_variant, num_ip_adapters=1,
                     attention_impl=config.attention, sharding=sharding_lib.placer(mesh, rules, "unet/"))
    set_remat(unet, config.remat)
    adapter_dtype = as_dtype(config.adapter_dtype)
    proj_graphdef, abstract_proj = nnx.split(abstract_model(
        lambda: build_image_proj(spec, dtype=adapter_dtype, rngs=nnx.Rngs(0))))
    encoders = load_encoders(config, info, mesh, rules) if with_encoders else None
    # The projection is abstract here; its values come from the sharded init below.
    model = TrainModel(unet, nnx.merge(proj_graphdef, abstract_proj),
                       vae=encoders.vae if encoders else None,
                       text_encoders=tuple(encoders.text_encoders) if encoders else (),
                       image_encoder=encoders.image_encoder if encoders else None)
    set_target(model, platform_of(mesh), chip=chip_of(mesh))  # kernels and layouts for the step's chips
    graphdef, trainable_state, frozen_state = nnx.split(model, IPAdapterParam, ...)
    trainable, frozen = flatten(trainable_state), flatten(frozen_state)
    shardings = sharding_lib.tree_shardings(trainable, rules, mesh)

    def init(ip_weights: Flat) -> Flat:
        # PyTorch-default projection init; to_k_ip/to_v_ip as loaded (copies of to_k/to_v).
        proj = nnx.state(build_image_proj(spec, dtype=adapter_dtype, rngs=nnx.Rngs(seed)))
        out = {f"image_proj/{k}": v for k, v in flatten(proj).items()}
        out.update({k: v.astype(adapter_dtype) for k, v in ip_weights.items()})
        return out

    ip_weights = {k: v for k, v in trainable.items() if not k.startswith("image_proj/")}
    trainable = jax.jit(init, out_shardings=shardings)(ip_weights)
    return Assembled(graphdef=graphdef, trainable=trainable, frozen=frozen,
                     trainable_paths=flat_paths(trainable_state), frozen_paths=flat_paths(frozen_state),
                     spec=spec, info=info, image_size=encoder_config.image_size)


def check_adapter_compatible_dicts(now: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    """A saved run's adapter spec must equal this run's; the error names the first difference."""
    now, saved = json.loads(json.dumps(now)), json.loads(json.dumps(saved))
    for key in now:
        if key != "name" and now[key] != saved.get(key):
            raise ConfigError(f"The checkpoint in the workdir trains a different adapter ({key}: "
                              f"{saved.get(key)!r} there, {now[key]!r} now); use a new workdir.")


def _adapter_name(key: str) -> str:
    """Our flat path -> the adapter file's Flax name (``image_proj.<path>``, ``<attn2 path>.to_k_ip.kernel``)."""
    parts = key.split("/")
    if parts[0] == "image_proj":
        return ".".join(parts)
    if parts[0] == "unet" and parts[-3] in ("to_k_ip", "to_v_ip") and parts[-2] == "0":
        return ".".join(parts[1:-2] + parts[-1:])
    raise AssertionError(f"unexpected trainable parameter {key}")


def to_ip_adapter(spec: AdapterSpec, params: Mapping[str, np.ndarray]) -> IPAdapter:
    """An ``IPAdapter`` (save/export API of ``ipadapter_jax.ip_adapter``) from host copies of the params."""
    tensors = {_adapter_name(k): np.asarray(v) for k, v in params.items()}
    graphdef, state = nnx.split(abstract_model(lambda: build_image_proj(spec, rngs=nnx.Rngs(0))))
    for path, var in nnx.to_flat_state(state):
        var.set_value(tensors["image_proj." + ".".join(map(str, path))])
    return IPAdapter(spec, nnx.merge(graphdef, state),
                     tuple(tensors[f"{p}.to_k_ip.kernel"] for p in spec.layer_paths),
                     tuple(tensors[f"{p}.to_v_ip.kernel"] for p in spec.layer_paths))


def from_ip_adapter(adapter: IPAdapter, like: Mapping[str, jax.Array]) -> Flat:
    """Params from a loaded adapter, typed and placed like ``like``."""
    tensors = adapter.tensors()
    return {k: jax.device_put(np.asarray(tensors[_adapter_name(k)]).astype(v.dtype), v.sharding)
            for k, v in like.items()}

"""IP-Adapter image projections (image features -> T tokens of the UNet's cross-attention width) and the
`AdapterSpec` that describes an adapter.

Attribute paths mirror the official PyTorch modules, so `image_proj.*` checkpoint keys map by the plain rename
table (`proj.weight` <-> `proj.kernel` transposed, LayerNorm `weight` <-> `scale`):

| variant           | official class (file)                       | parameters                                   |
|-------------------|---------------------------------------------|----------------------------------------------|
| base              | ImageProjModel (ip_adapter.py)              | proj, norm                                   |
| full              | MLPProjModel (ip_adapter.py)                | proj.0, proj.2, proj.3 (LayerNorm)           |
| plus              | Resampler (resampler.py)                    | latents, proj_in, layers.*, proj_out, norm_out |
| faceid, -portrait | MLPProjModel (ip_adapter_faceid.py)         | proj.0, proj.2, norm                         |
| faceid-plus       | ProjPlusModel (ip_adapter_faceid.py)        | proj.0, proj.2, norm, perceiver_resampler.*  |
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.errors import ConfigError, UserError
from ipadapter_jax.models.layers import IPAdapterParam, LayerNorm, Linear, gelu
from ipadapter_jax.models.resampler import FacePerceiverResampler, Resampler
from ipadapter_jax.models.transformer import Placeholder

VARIANTS = ("base", "plus", "full", "faceid", "faceid-portrait", "faceid-plus")
IMAGE_EMBEDS = "image_embeds"  # visual_projection(post_layernorm(CLS)), (B, P)
PENULTIMATE = "hidden_states[-2]"  # the encoder's penultimate layer output, CLS included, (B, 1 + N, C)
NO_IMAGE = "none"  # FaceID: InsightFace embeddings only
FEATURE_OF = {"base": IMAGE_EMBEDS, "plus": PENULTIMATE, "full": PENULTIMATE, "faceid": NO_IMAGE,
              "faceid-portrait": NO_IMAGE, "faceid-plus": PENULTIMATE}  # the CLIP output each variant reads
_P = dict(param_type=IPAdapterParam)


@dataclasses.dataclass(frozen=True)
class ResamplerSpec:
    """Perceiver hyperparameters (Plus: `Resampler`; FaceID-Plus: `FacePerceiverResampler`, queries = ID tokens)."""

    dim: int
    depth: int
    heads: int
    num_queries: int
    embedding_dim: int  # the image encoder's hidden size
    output_dim: int  # the UNet's cross-attention width
    dim_head: int = 64
    ff_mult: int = 4


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """Everything needed to rebuild one IP-Adapter and check it against a UNet and an image encoder.

    variant: one of VARIANTS. num_tokens: image tokens per image (257 for full = the ViT-H/14 sequence).
    image_feature / image_feature_dim: which CLIP output the projection reads and its width (0 for FaceID).
    layer_paths / layer_hidden_sizes: the UNet `attn2` paths in official `ip_adapter.<2i+1>` order, and each
    layer's width (rows of to_k_ip). face_embed_dim / face_hidden_dim: the ID MLP (512 -> 1024) of FaceID.
    lora_rank: rank of the FaceID LoRA carried in the file (0: none). name: where the adapter came from.
    """

    variant: str
    num_tokens: int
    cross_attention_dim: int
    image_feature: str
    image_feature_dim: int
    layer_paths: tuple[str, ...]
    layer_hidden_sizes: tuple[int, ...]
    resampler: ResamplerSpec | None = None
    face_embed_dim: int = 0
    face_hidden_dim: int = 0
    lora_rank: int = 0
    name: str = ""

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ConfigError(f"IP-Adapter variant {self.variant!r} is unknown; use one of {', '.join(VARIANTS)}.")
        if self.image_feature != FEATURE_OF[self.variant]:
            raise ConfigError(f"a {self.variant} IP-Adapter reads {FEATURE_OF[self.variant]}, "
                              f"not {self.image_feature}; fix image_feature in its spec.")
        if len(self.layer_paths) != len(self.layer_hidden_sizes):
            raise ConfigError(f"the IP-Adapter spec lists {len(self.layer_paths)} layer paths but "
                              f"{len(self.layer_hidden_sizes)} hidden sizes; they must pair up.")
        needs_resampler = self.variant in ("plus", "faceid-plus")
        if needs_resampler != (self.resampler is not None):
            raise ConfigError(f"a {self.variant} IP-Adapter spec {'needs' if needs_resampler else 'takes no'} "
                              "resampler hyperparameters.")
        if self.variant.startswith("faceid") and not (self.face_embed_dim and self.face_hidden_dim):
            raise ConfigError("a FaceID IP-Adapter spec needs face_embed_dim and face_hidden_dim (512, 1024).")
        if (self.variant == "faceid") != (self.lora_rank > 0) and self.variant in ("faceid", "faceid-portrait"):
            raise ConfigError("a faceid IP-Adapter carries a LoRA (lora_rank > 0) and a faceid-portrait one none; "
                              "fix lora_rank or the variant.")

    @property
    def num_layers(self) -> int:
        return len(self.layer_paths)

    @property
    def needs_image_encoder(self) -> bool:
        return self.image_feature != NO_IMAGE

    @property
    def needs_face_embeds(self) -> bool:
        return self.variant.startswith("faceid")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AdapterSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - fields)
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in raw)
        if unknown or missing:
            raise ConfigError(f"IP-Adapter spec has unknown fields {unknown} / lacks fields {missing}; "
                              "re-export the adapter with this version of ipadapter-jax.")
        raw = dict(raw)
        try:
            if raw.get("resampler") is not None:
                raw["resampler"] = ResamplerSpec(**raw["resampler"])
        except TypeError as e:
            raise ConfigError(f"IP-Adapter spec has a malformed resampler entry ({e}).") from None
        raw["layer_paths"] = tuple(raw["layer_paths"])
        raw["layer_hidden_sizes"] = tuple(int(h) for h in raw["layer_hidden_sizes"])
        return cls(**raw)

    @classmethod
    def from_json(cls, text: str) -> AdapterSpec:
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"IP-Adapter spec is not valid JSON ({e}).") from None
        return cls.from_dict(raw)


class ImageProjModel(nnx.Module):
    """Base adapters: `proj` (Linear P -> T*C), reshape to T tokens, `norm` (LayerNorm C)."""

    def __init__(self, *, cross_attention_dim: int, clip_embeddings_dim: int, num_tokens: int, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.proj = Linear(clip_embeddings_dim, num_tokens * cross_attention_dim, dtype=dtype, rngs=rngs, **_P)
        self.norm = LayerNorm(cross_attention_dim, dtype=dtype, **_P)
        self.num_tokens = num_tokens

    def __call__(self, image_embeds_BP: jax.Array) -> jax.Array:
        x = self.proj(image_embeds_BP.astype(self.proj.kernel.dtype))
        return self.norm(x.reshape(x.shape[0], self.num_tokens, -1))


class MLPProjModel(nnx.Module):
    """Full(-face) adapters: per token Linear, GELU, Linear, LayerNorm (`proj.0|2|3`)."""

    def __init__(self, *, cross_attention_dim: int, clip_embeddings_dim: int, dtype=jnp.float32, rngs: nnx.Rngs):
        self.proj = nnx.List([
            Linear(clip_embeddings_dim, clip_embeddings_dim, dtype=dtype, rngs=rngs, **_P),
            Placeholder(),
            Linear(clip_embeddings_dim, cross_attention_dim, dtype=dtype, rngs=rngs, **_P),
            LayerNorm(cross_attention_dim, dtype=dtype, **_P),
        ])

    def __call__(self, hidden_BTC: jax.Array) -> jax.Array:
        x = hidden_BTC.astype(self.proj[0].kernel.dtype)
        return self.proj[3](self.proj[2](gelu(self.proj[0](x))))


def _id_mlp(face_embed_dim: int, face_hidden_dim: int, out: int, dtype, rngs) -> nnx.List:
    return nnx.List([Linear(face_embed_dim, face_hidden_dim, dtype=dtype, rngs=rngs, **_P), Placeholder(),
                     Linear(face_hidden_dim, out, dtype=dtype, rngs=rngs, **_P)])


class FaceIDProjModel(nnx.Module):
    """FaceID (and Portrait): the official `MLPProjModel` of ip_adapter_faceid.py: ID MLP -> T tokens -> norm."""

    def __init__(self, *, cross_attention_dim: int, face_embed_dim: int, face_hidden_dim: int, num_tokens: int,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.proj = _id_mlp(face_embed_dim, face_hidden_dim, num_tokens * cross_attention_dim, dtype, rngs)
        self.norm = LayerNorm(cross_attention_dim, dtype=dtype, **_P)
        self.num_tokens = num_tokens

    def __call__(self, face_embeds_BD: jax.Array) -> jax.Array:
        x = self.proj[2](gelu(self.proj[0](face_embeds_BD.astype(self.proj[0].kernel.dtype))))
        return self.norm(x.reshape(x.shape[0], self.num_tokens, -1))


class ProjPlusModel(nnx.Module):
    """FaceID-Plus/PlusV2: ID tokens query CLIP `hidden_states[-2]`; PlusV2 adds them back (`shortcut`)."""

    def __init__(self, *, cross_attention_dim: int, face_embed_dim: int, face_hidden_dim: int, num_tokens: int,
                 resampler: ResamplerSpec, dtype=jnp.float32, rngs: nnx.Rngs):
        self.proj = _id_mlp(face_embed_dim, face_hidden_dim, num_tokens * cross_attention_dim, dtype, rngs)
        self.norm = LayerNorm(cross_attention_dim, dtype=dtype, **_P)
        r = resampler
        self.perceiver_resampler = FacePerceiverResampler(
            dim=r.dim, depth=r.depth, dim_head=r.dim_head, heads=r.heads, embedding_dim=r.embedding_dim,
            output_dim=r.output_dim, ff_mult=r.ff_mult, dtype=dtype, rngs=rngs)
        self.num_tokens = num_tokens

    def __call__(self, face_embeds_BD: jax.Array, clip_embeds_BTC: jax.Array, *, shortcut: bool = False,
                 scale: float | jax.Array = 1.0) -> jax.Array:
        dtype = self.proj[0].kernel.dtype
        x = self.proj[2](gelu(self.proj[0](face_embeds_BD.astype(dtype))))
        id_tokens = self.norm(x.reshape(x.shape[0], self.num_tokens, -1))
        out = self.perceiver_resampler(id_tokens, clip_embeds_BTC.astype(dtype))
        if shortcut:
            out = id_tokens + jnp.asarray(scale, dtype) * out
        return out


def build_image_proj(spec: AdapterSpec, *, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Module:
    """The projection module `spec` describes, PyTorch-default initialised (use under `nnx.eval_shape` to load)."""
    c = spec.cross_attention_dim
    common = dict(dtype=dtype, rngs=rngs)
    if spec.variant == "base":
        return ImageProjModel(cross_attention_dim=c, clip_embeddings_dim=spec.image_feature_dim,
                              num_tokens=spec.num_tokens, **common)
    if spec.variant == "full":
        return MLPProjModel(cross_attention_dim=c, clip_embeddings_dim=spec.image_feature_dim, **common)
    if spec.variant == "plus":
        r = spec.resampler
        return Resampler(dim=r.dim, depth=r.depth, dim_head=r.dim_head, heads=r.heads, num_queries=r.num_queries,
                         embedding_dim=r.embedding_dim, output_dim=r.output_dim, ff_mult=r.ff_mult, **common)
    face = dict(cross_attention_dim=c, face_embed_dim=spec.face_embed_dim, face_hidden_dim=spec.face_hidden_dim,
                num_tokens=spec.num_tokens, **common)
    if spec.variant == "faceid-plus":
        return ProjPlusModel(resampler=spec.resampler, **face)
    return FaceIDProjModel(**face)


def project_tokens(image_proj: nnx.Module, spec: AdapterSpec, features: jax.Array | None = None,
                   face_embeds: jax.Array | None = None, *, shortcut: bool = False,
                   shortcut_scale: float | jax.Array = 1.0) -> jax.Array:
    """Image tokens (..., T, C) for features with any leading dims, e.g. (B, N_img, P) -> (B, N_img, T, C).

    features: `image_embeds` (..., P) or `hidden_states[-2]` (..., L, C) per `spec.image_feature` (None for
    FaceID); face_embeds (..., 512) for FaceID variants. `shortcut`/`shortcut_scale`: FaceID-PlusV2 only.
    """
    if spec.needs_face_embeds and face_embeds is None:
        raise UserError(f"a {spec.variant} IP-Adapter needs face embeddings: pass InsightFace normed_embedding "
                        "vectors (512-d) for each reference face.")
    if spec.needs_image_encoder and features is None:
        raise UserError(f"a {spec.variant} IP-Adapter needs a reference image ({spec.image_feature} of its "
                        "image encoder); pass one.")
    per_item = {IMAGE_EMBEDS: 1, PENULTIMATE: 2, NO_IMAGE: 0}[spec.image_feature]
    if spec.variant == "faceid-plus":
        lead = face_embeds.shape[:-1]
        tokens = image_proj(face_embeds.reshape(-1, face_embeds.shape[-1]),
                            features.reshape(-1, *features.shape[-per_item:]), shortcut=shortcut,
                            scale=shortcut_scale)
    elif spec.needs_face_embeds:
        lead = face_embeds.shape[:-1]
        tokens = image_proj(face_embeds.reshape(-1, face_embeds.shape[-1]))
    else:
        lead = features.shape[:-per_item]
        tokens = image_proj(features.reshape(-1, *features.shape[-per_item:]))
    return tokens.reshape(*lead, *tokens.shape[1:])

"""IP-Adapter image projections: image features -> T tokens of the UNet's cross-attention width, for each
variant an `AdapterSpec` (models/adapter_spec.py) describes.

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

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.errors import UserError
from ipadapter_jax.models.adapter_spec import IMAGE_EMBEDS, NO_IMAGE, PENULTIMATE, AdapterSpec, ResamplerSpec
from ipadapter_jax.models.layers import IPAdapterParam, LayerNorm, Linear, gelu
from ipadapter_jax.models.resampler import FacePerceiverResampler, Resampler
from ipadapter_jax.models.transformer import Placeholder

_P = dict(param_type=IPAdapterParam)


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
    """The projection module `spec` describes, PyTorch-default initialised (built by `models.layers.abstract_model`
    to load weights into)."""
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

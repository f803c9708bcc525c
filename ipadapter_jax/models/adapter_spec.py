"""What an IP-Adapter is: its variant, token count, the image features it reads, the UNet layers it drives
(`AdapterSpec`, with the perceiver sizes of Plus variants in `ResamplerSpec`), and `make_spec`, a new adapter's
spec with the official training recipe's defaults."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ipadapter_jax.errors import ConfigError
from ipadapter_jax.models.unet_config import UNetConfig, standard_base

VARIANTS = ("base", "plus", "full", "faceid", "faceid-portrait", "faceid-plus")
IMAGE_EMBEDS = "image_embeds"  # visual_projection(post_layernorm(CLS)), (B, P)
PENULTIMATE = "hidden_states[-2]"  # the encoder's penultimate layer output, CLS included, (B, 1 + N, C)
NO_IMAGE = "none"  # FaceID: InsightFace embeddings only
FEATURE_OF = {"base": IMAGE_EMBEDS, "plus": PENULTIMATE, "full": PENULTIMATE, "faceid": NO_IMAGE,
              "faceid-portrait": NO_IMAGE, "faceid-plus": PENULTIMATE}  # the CLIP output each variant reads


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


def make_spec(variant: str, unet_config: UNetConfig | str, *, image_feature_dim: int = 0, num_tokens: int | None = None,
              resampler: ResamplerSpec | None = None, face_embed_dim: int = 512, lora_rank: int | None = None,
              name: str = "") -> AdapterSpec:
    """A new adapter's spec with the official recipe's defaults (tutorial_train*.py) for this UNet.

    image_feature_dim: the encoder's `projection_dim` (base) or `hidden_size` (plus, full, faceid-plus).
    Plus: 16 queries; Resampler dim = cross width, 12 heads (SDXL: dim 1280, 20 heads). FaceID: 4 tokens,
    LoRA rank 128; Portrait: 16 tokens, no LoRA.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"IP-Adapter variant {variant!r} is unknown; use one of {', '.join(VARIANTS)}.")
    config = unet_config if isinstance(unet_config, UNetConfig) else standard_base(str(unet_config))
    if config is None:
        raise ConfigError(f"{unet_config!r} is not a UNet config nor a standard base (sd15, sd2, sdxl).")
    layers = config.cross_attention_layers()
    cross = config.context_dim
    default_tokens = {"base": 4, "plus": 16, "full": 257, "faceid": 4, "faceid-portrait": 16, "faceid-plus": 4}
    tokens = num_tokens or default_tokens[variant]
    face = dict(face_embed_dim=face_embed_dim, face_hidden_dim=2 * face_embed_dim) if variant.startswith(
        "faceid") else {}
    if variant in ("plus", "faceid-plus") and resampler is None:
        if image_feature_dim <= 0:
            raise ConfigError(f"a {variant} IP-Adapter needs image_feature_dim (the encoder's hidden size).")
        dim, heads = (1280, 20) if variant == "plus" and cross == 2048 else (
            cross, 12 if variant == "plus" else max(cross // 64, 1))
        resampler = ResamplerSpec(dim=dim, depth=4, heads=heads, num_queries=tokens,
                                  embedding_dim=image_feature_dim, output_dim=cross)
    feature = FEATURE_OF[variant]
    if feature != NO_IMAGE and image_feature_dim <= 0:
        raise ConfigError(f"a {variant} IP-Adapter needs image_feature_dim (the image encoder's width).")
    rank = lora_rank if lora_rank is not None else (128 if variant == "faceid" else 0)
    return AdapterSpec(variant=variant, num_tokens=tokens, cross_attention_dim=cross, image_feature=feature,
                       image_feature_dim=image_feature_dim if feature != NO_IMAGE else 0,
                       layer_paths=tuple(la.path for la in layers),
                       layer_hidden_sizes=tuple(la.hidden_size for la in layers),
                       resampler=resampler if variant in ("plus", "faceid-plus") else None, lora_rank=rank,
                       name=name, **face)

"""From an image prompt's settings to what every cross-attention layer does with its image tokens: the weight
(scale forms or a weight type), the embeds scaling (K'/V' scaled, with the C/1280 penalty and the mean shift of
V'), and the alternative tokens that the precise variants and composition images switch to per layer. Host-side;
the arrays reach the UNet as traced `LayerControls` (models/ip_conditioning.py), so nothing here recompiles."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ipadapter_jax.errors import UserError
from ipadapter_jax.generation import stages
from ipadapter_jax.generation.image_features import pixel_values
from ipadapter_jax.models.ip_conditioning import LayerControls
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.pipelines.image_prompt import ImagePrompt, combine_features, layer_scales
from ipadapter_jax.pipelines.weight_types import block_weights, composition_layers


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One adapter of one item, per layer ((n_layers,) or (n_layers, N) with masks): the layer adds
    `scale * attention(q, key_scale * K', V' + mean_shift * mu)` (mu: V' averaged over the tokens), reading the
    alternative tokens where `use_alt` is 1."""

    scale: np.ndarray
    key_scale: np.ndarray
    mean_shift: np.ndarray
    use_alt: np.ndarray


def embeds_scaled(mode: str, weights: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale, key_scale, mean_shift) of the embeds scaling `mode` for layer weights w and widths C (broadcast):
    v: w Attn(q, K', V'); kv: Attn(q, wK', wV') = w Attn(q, wK', V'); kv-penalty: the same with w~ = w C/1280;
    kv-mean-penalty: Attn(q, w~K', V' - mu + w~ mu), no image prompt where w = 0."""
    w = np.asarray(weights, np.float32)
    zeros, ones = np.zeros_like(w), np.ones_like(w)
    if mode == "v":
        return w, ones, zeros
    if mode == "kv":
        return w, w, zeros
    penalized = (w * (np.asarray(widths, np.float32) / np.float32(1280))).astype(np.float32)
    if mode == "kv-penalty":
        return penalized, penalized, zeros
    if mode == "kv-mean-penalty":
        return (w != 0).astype(np.float32), penalized, penalized - 1
    raise AssertionError(mode)


def _float_scale(prompt: ImagePrompt) -> float:
    if isinstance(prompt.scale, (int, float, np.floating, np.integer)) and not isinstance(prompt.scale, bool):
        return float(prompt.scale)
    raise UserError(f"weight type {prompt.weight_type!r} (or layer weights) spreads one float scale over the UNet's "
                    f"blocks; pass a float scale, not {prompt.scale!r}.")


def prompt_layers(prompt: ImagePrompt, config: UNetConfig, num_masked_images: int | None = None) -> LayerPlan:
    n = config.num_ip_layers
    if prompt.weight_type == "linear" and prompt.layer_weights is None:
        weights = layer_scales(prompt.scale, config, num_masked_images)
        use_alt = np.zeros(n, np.float32)
    else:
        weights, use_alt = block_weights(prompt.weight_type, _float_scale(prompt), config,
                                         composition_weight=prompt.composition_weight,
                                         layer_weights=prompt.layer_weights)
    if prompt.composition_images:
        use_alt = composition_layers(config)
    widths = np.asarray([layer.hidden_size for layer in config.cross_attention_layers()], np.float32)
    if num_masked_images is not None:
        shape = (n, num_masked_images)
        weights, use_alt = np.broadcast_to(weights.reshape(n, -1), shape), np.broadcast_to(use_alt[:, None], shape)
        widths = widths[:, None]
    scale, key_scale, mean_shift = embeds_scaled(prompt.embeds_scaling, weights, widths)
    return LayerPlan(scale, np.ascontiguousarray(key_scale), mean_shift, np.ascontiguousarray(use_alt))


def adapter_controls(prompts: list[ImagePrompt], tokens: list[tuple[jax.Array, jax.Array]],
                     composition: list[jax.Array | None], config: UNetConfig, num_masked_images: int | None
                     ) -> tuple[jax.Array, LayerControls, LayerControls]:
    """One adapter over a batch's items: its scales, and the negative and positive branches' `LayerControls`.
    Per item: its prompt, its (negative, positive) tokens (rows, N, T, C), its composition tokens or None.
    Controls shared by every item stay (n_layers,); otherwise one row per item, like per-item scales."""
    plans = [prompt_layers(p, config, num_masked_images) for p in prompts]
    fields = [f.name for f in dataclasses.fields(LayerPlan)]
    if all(np.array_equal(getattr(plans[0], f), getattr(p, f)) for p in plans for f in fields):
        arrays = [jnp.asarray(getattr(plans[0], f)) for f in fields]
    elif num_masked_images is not None:
        raise UserError("items with masks in one batch must share their IP-Adapter scales and weight types.")
    else:
        arrays = [jnp.asarray(np.stack([getattr(p, f) for p in plans])) for f in fields]
    alt_negative, alt_positive = [], []
    for (negative, positive), comp in zip(tokens, composition, strict=True):
        if comp is None:  # the precise swap: unconditional takes the conditional tokens, conditional zero tokens
            alt_negative.append(positive)
            alt_positive.append(jnp.zeros_like(positive))
        else:  # a composition image replaces the conditional tokens
            if comp.shape[1:] != positive.shape[1:]:
                raise UserError(f"the composition images give {comp.shape[1]} image(s) of tokens but the references "
                                f"give {positive.shape[1]}; pass as many composition images or combine them.")
            alt_negative.append(negative)
            alt_positive.append(jnp.broadcast_to(comp, positive.shape))
    scale, key_scale, mean_shift, use_alt = arrays
    return (scale, LayerControls(key_scale, mean_shift, use_alt, jnp.concatenate(alt_negative)),
            LayerControls(key_scale, mean_shift, use_alt, jnp.concatenate(alt_positive)))


def composition_tokens(pipe, image_prompts: list[ImagePrompt]) -> list[jax.Array | None]:
    """Per adapter, the (1, N, T, C) tokens of its composition images (combined like its references), or None."""
    out = []
    for a, (adapter, prompt) in enumerate(zip(pipe.adapters, image_prompts, strict=True)):
        if not prompt.composition_images:
            out.append(None)
            continue
        spec = adapter.spec
        if not spec.needs_image_encoder or spec.needs_face_embeds:
            raise UserError(f"composition images need an adapter that reads CLIP image features only; the "
                            f"{spec.variant} adapter in slot {a} does not.")
        pixels = pixel_values(pipe.image_processor, prompt.loaded_composition_images())
        features = stages.image_features(pipe._encoder.graphdef, pipe._encoder.state, spec, jnp.asarray(pixels))
        combined = jnp.asarray(combine_features(np.asarray(features), prompt.combine)[None])
        out.append(stages.image_tokens(pipe._projections[a].graphdef, pipe._projections[a].state, spec, combined,
                                       None, prompt.shortcut, jnp.float32(prompt.shortcut_scale)))
    return out


def place_controls(controls: tuple[LayerControls | None, ...] | None, place) -> tuple | None:
    """`place(array)` on each adapter's alternative tokens (per-row data, split like the batch)."""
    return controls and tuple(c and dataclasses.replace(c, alt_tokens=place(c.alt_tokens)) for c in controls)

"""The compiled stages of generation. Each is a pure function of (graphdef, state) pairs and arrays under
`jax.jit`, so XLA caches one executable per model and input shape; a graphdef is static (hashable), states and
inputs are traced. Shardings follow the inputs: parameters replicated, batches split over the mesh's devices."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from ipadapter_jax.generation import image_features as features
from ipadapter_jax.generation import prompts
from ipadapter_jax.generation.conditioning import Conditioning
from ipadapter_jax.generation.controlnet import ControlGuidance
from ipadapter_jax.generation.denoise import Inpainting, denoise
from ipadapter_jax.models.adapter_spec import AdapterSpec
from ipadapter_jax.models.image_proj import project_tokens
from ipadapter_jax.models.vae import scale_latents
from ipadapter_jax.schedulers import Plan, Scheduler


@dataclasses.dataclass(frozen=True)
class Bound:
    """A module split once into its static graph and its arrays (placed where the pipeline wants them)."""

    graphdef: nnx.GraphDef
    state: nnx.State

    @classmethod
    def of(cls, module: nnx.Module, sharding=None) -> Bound:
        """`sharding`: one for every array (e.g. replicated over the mesh), or None to keep their placement."""
        graphdef, state = nnx.split(module)
        # Already placed so (one device): skip the copy-free but per-array device_put (0.05 s for an SD1.5 pipeline).
        if sharding is not None and not all(isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim)
                                            for x in jax.tree.leaves(state)):
            state = jax.device_put(state, sharding)
        return cls(graphdef, state)



@partial(jax.jit, static_argnums=0)
def encode_text(graphdefs, states, ids):
    encoders = [nnx.merge(g, s) for g, s in zip(graphdefs, states, strict=True)]
    return prompts.encode(encoders, ids)


@partial(jax.jit, static_argnums=(0, 2, 4))
def image_features(graphdef, state, spec: AdapterSpec, pixel_values_NCHW, negative: bool = False):
    """What `spec`'s projection reads (or its official negative branch); see generation/image_features.py."""
    return features.image_features(nnx.merge(graphdef, state), pixel_values_NCHW, spec, negative=negative)


@partial(jax.jit, static_argnums=(0, 2, 5))
def image_tokens(graphdef, state, spec: AdapterSpec, features, face_embeds, shortcut: bool, shortcut_scale):
    return project_tokens(nnx.merge(graphdef, state), spec, features, face_embeds, shortcut=shortcut,
                          shortcut_scale=shortcut_scale)


@partial(jax.jit, static_argnums=(0,))
def vae_encode(graphdef, state, pixels_BHWC, eps):
    """Scaled latents of images in [-1, 1]: the posterior sample mean + std * eps (eps: standard normal)."""
    vae = nnx.merge(graphdef, state)
    posterior = vae.encode(pixels_BHWC)
    z = posterior.mean.astype(jnp.float32) + posterior.std.astype(jnp.float32) * eps
    c = vae.config
    return scale_latents(z, scaling_factor=c.scaling_factor, shift_factor=c.shift_factor,
                         latents_mean=c.latents_mean, latents_std=c.latents_std)


@partial(jax.jit, static_argnums=(0,))
def vae_decode(graphdef, state, latents_BHWC):
    vae = nnx.merge(graphdef, state)
    return vae.pixels_from_latents(latents_BHWC).astype(jnp.float32)


@partial(jax.jit, static_argnums=(0, 2, 10), static_argnames=("control_graphs",))
def run_denoise(graphdef, state, scheduler: Scheduler, plan: Plan, latents, cond: Conditioning, guidance_scale,
                guidance_rescale, ip_window, keys, cfg: bool, inpaint: Inpainting | None, *,
                control_graphs: tuple = (), control_states: tuple = (), control: ControlGuidance | None = None):
    """`control_graphs`/`control_states`: the ControlNets' split halves (graphs static, weights traced), with
    `control` their traced images, scales and windows."""
    unet = nnx.merge(graphdef, state)
    controlnets = tuple(nnx.merge(g, s) for g, s in zip(control_graphs, control_states, strict=True))
    return denoise(unet, scheduler, plan, latents, cond, guidance_scale=guidance_scale,
                   guidance_rescale=guidance_rescale, ip_window=ip_window, keys=keys, cfg=cfg, inpaint=inpaint,
                   controlnets=controlnets, control=control)

"""Sample grids during training: fixed prompts x fixed image prompts, DDIM with classifier-free guidance on
both the text and the image (the negative branch is exactly the training drop: empty prompt, dropped image).

Conditioning is encoded once at start; each grid then runs one jitted denoising loop and VAE decode with
the current adapter. Rows are image prompts, columns text prompts.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ipadapter_jax.data.transforms import load_tokenizer
from ipadapter_jax.errors import ConfigError
from ipadapter_jax.generation.conditioning import Conditioning, guided, sdxl_time_ids, unit_ip
from ipadapter_jax.generation.denoise import denoise
from ipadapter_jax.generation.image_features import image_features, image_processor_for, pixel_values
from ipadapter_jax.generation.prompts import encode as encode_text
from ipadapter_jax.generation.prompts import tokenize_all
from ipadapter_jax.images import grid, load_image, save_image, to_pil
from ipadapter_jax.models.image_proj import project_tokens
from ipadapter_jax.schedulers import load_scheduler
from ipadapter_jax.training import loss as loss_lib


class SampleGrid:
    """``grid(params, frozen) -> PIL image``; ``encoders`` has ``.vae``, ``.text_encoders``, ``.image_encoder``."""

    def __init__(self, config, assembled, encoders, mesh):
        m = config.monitor
        if not m.sample_images:
            raise ConfigError("monitor.sample_every_steps is set but monitor.sample_images is empty; list image "
                              "prompt files (or set sample_every_steps=0).")
        info, spec = assembled.info, assembled.spec
        prompts = list(m.sample_prompts) or [""]
        images = [load_image(p, what="sample image") for p in m.sample_images]
        tokenizers = [load_tokenizer(p) for p in info.tokenizer_paths]
        enc_graphdef, enc_state = nnx.split(encoders)

        @jax.jit
        def conditioning(enc_state, ids, empty_ids, clip):
            enc = nnx.merge(enc_graphdef, enc_state)
            ctx, pooled = encode_text(tuple(enc.text_encoders), ids)
            uncond = loss_lib.unconditional(enc, spec, empty_ids, assembled.image_size)
            return ctx, pooled, image_features(enc.image_encoder, clip, spec), uncond

        processor = image_processor_for(config.model.image_encoder, assembled.image_size)
        ids = tuple(jnp.asarray(x) for x in tokenize_all(tokenizers, prompts))
        empty = tuple(jnp.asarray(x) for x in tokenize_all(tokenizers, [""]))
        ctx, pooled, feats, uncond = conditioning(enc_state, ids, empty, jnp.asarray(pixel_values(processor, images)))
        n_p, n_i = len(prompts), len(images)
        # Row-major grid: image i, prompt p -> item i * n_p + p.
        self.cond = {
            "ctx": jnp.tile(ctx, (n_i, 1, 1)),
            "pooled": None if pooled is None else jnp.tile(pooled, (n_i, 1)),
            "image": jnp.repeat(feats, n_p, axis=0),
            "uncond": uncond,
        }
        self.columns = n_p
        res = m.sample_resolution or config.data.resolution
        self.latent = res // info.vae_scale_factor
        self.channels = info.latent_channels
        self.time_ids = jnp.asarray(sdxl_time_ids(n_p * n_i, res, res)) if info.is_xl else None
        scheduler = load_scheduler(info.folder / "scheduler", name="ddim")
        plan = scheduler.plan(m.sample_num_steps)
        vae_graphdef, self.vae_state = nnx.split(encoders.vae)
        guidance = float(m.sample_guidance)
        self.seed = m.sample_seed

        def sample(params, frozen, vae_state, cond, time_ids, key):
            model = assembled.merge(params, frozen)
            dtype = model.unet.conv_in.kernel.dtype
            n = cond["ctx"].shape[0]
            u = cond["uncond"]
            layers = model.unet.num_ip_layers

            def tokens(features):
                return project_tokens(model.image_proj, spec, features)[:, None].astype(dtype)

            pooled = cond["pooled"]
            positive = Conditioning(cond["ctx"], pooled, time_ids, unit_ip(tokens(cond["image"]), layers))
            negative = Conditioning(
                jnp.broadcast_to(u.text[None], cond["ctx"].shape),
                None if pooled is None else jnp.broadcast_to(u.pooled[None], pooled.shape), time_ids,
                unit_ip(tokens(jnp.broadcast_to(u.image.astype(cond["image"].dtype), cond["image"].shape)), layers))
            c = guided(negative, positive)
            k_init, k_steps = jax.random.split(key)
            latents = jax.random.normal(k_init, (n, self.latent, self.latent, self.channels), jnp.float32)
            latents = latents * jnp.float32(plan.init_noise_sigma)
            latents = denoise(model.unet, scheduler, plan, latents, c, guidance_scale=jnp.float32(guidance),
                              guidance_rescale=jnp.float32(0.0), ip_window=jnp.asarray([0.0, 1.0], jnp.float32),
                              keys=jax.random.split(k_steps, n), cfg=True)
            return nnx.merge(vae_graphdef, vae_state).pixels_from_latents(latents).astype(jnp.float32)

        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self._sample = jax.jit(sample, out_shardings=replicated)
        self._mesh = mesh

    def __call__(self, params, frozen):
        key = jax.random.key(self.seed)
        with jax.set_mesh(self._mesh):
            pixels = self._sample(params, frozen, self.vae_state, self.cond, self.time_ids, key)
        host = np.asarray(pixels.addressable_data(0))
        return grid(to_pil(host), columns=self.columns)


def write_grid(image, workdir: Path, step: int) -> Path:
    path = Path(workdir) / "samples" / f"step_{step:08d}.png"
    save_image(image, path)
    return path

"""Generation with the adapter being trained, shared by the sample grids and the evaluation during training.

`Sampler` encodes its items (a caption and an image prompt each) once at start; each call then runs one jitted
function, DDIM with classifier-free guidance on both the text and the image (the negative branch is exactly the
training drop: empty prompt, dropped image) and the VAE decode, over batches split across the mesh's devices.
Item i's noise comes from its own key, ``fold_in(key(seed), i)``, so an image depends neither on the batch nor on
the number of devices. `SampleGrid` lays out prompts x image prompts as a grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from ipadapter_jax import sharding as sharding_lib
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


class Sampler:
    """``sampler(params, frozen) -> N PIL images``: item i generated from ``captions[i]`` with ``images[i]``
    as the image prompt at IP scale ``scale``. ``encoders`` has ``.vae``, ``.text_encoders``, ``.image_encoder``;
    ``batch_size`` items run per call of the jitted function (rounded to a multiple of the mesh's size)."""

    def __init__(self, model_config, assembled, encoders, mesh, captions: Sequence[str], images: Sequence, *,
                 num_steps: int, guidance: float, resolution: int, seed: int, scale: float = 1.0,
                 batch_size: int | None = None):
        if len(captions) != len(images) or not images:
            raise ValueError(f"{len(captions)} captions for {len(images)} image prompts")
        info, spec = assembled.info, assembled.spec
        self.num_items = len(images)
        size = mesh.size
        want = batch_size or self.num_items
        self.batch = max(size, -(-min(want, self.num_items) // size) * size)
        tokenizers = [load_tokenizer(p) for p in info.tokenizer_paths]
        enc_graphdef, enc_state = nnx.split(encoders)

        @jax.jit
        def conditioning(enc_state, ids, empty_ids, clip):
            enc = nnx.merge(enc_graphdef, enc_state)
            ctx, pooled = encode_text(tuple(enc.text_encoders), ids)
            uncond = loss_lib.unconditional(enc, spec, empty_ids, assembled.image_size)
            return ctx, pooled, image_features(enc.image_encoder, clip, spec), uncond

        processor = image_processor_for(model_config.image_encoder, assembled.image_size)
        padded = -self.num_items % self.batch
        rows = list(range(self.num_items)) + [self.num_items - 1] * padded  # the last item fills the last batch
        ids = tuple(jnp.asarray(x[rows]) for x in tokenize_all(tokenizers, list(captions)))
        empty = tuple(jnp.asarray(x) for x in tokenize_all(tokenizers, [""]))
        clip = jnp.asarray(pixel_values(processor, list(images))[rows])
        ctx, pooled, feats, uncond = conditioning(enc_state, ids, empty, clip)
        self._batch_sharding = sharding_lib.batch_sharding(mesh)
        self.replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
        keys = jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(
            jnp.arange(len(rows), dtype=jnp.uint32)))
        self._items = jax.tree.map(np.asarray, {"ctx": ctx, "pooled": pooled, "image": feats, "keys": keys})
        self._uncond = place(jax.tree.map(np.asarray, uncond), self.replicated)
        latent = resolution // info.vae_scale_factor
        time_ids = jnp.asarray(sdxl_time_ids(self.batch, resolution, resolution)) if info.is_xl else None
        self._time_ids = None if time_ids is None else place(np.asarray(time_ids), self._batch_sharding)
        scheduler = load_scheduler(info.folder / "scheduler", name="ddim")
        plan = scheduler.plan(num_steps)
        vae_graphdef, vae_state = nnx.split(encoders.vae)
        self._vae_state = vae_state
        channels = info.latent_channels
        self._scale = jnp.float32(scale)

        def sample(params, frozen, vae_state, items, uncond, time_ids, guidance, scale):
            model = assembled.merge(params, frozen)
            dtype = model.unet.conv_in.kernel.dtype
            layers = model.unet.num_ip_layers

            def tokens(features):
                return project_tokens(model.image_proj, spec, features)[:, None].astype(dtype)

            ctx, pooled, image = items["ctx"], items["pooled"], items["image"]
            positive = Conditioning(ctx, pooled, time_ids, unit_ip(tokens(image), layers, scale))
            negative = Conditioning(
                jnp.broadcast_to(uncond.text[None], ctx.shape),
                None if pooled is None else jnp.broadcast_to(uncond.pooled[None], pooled.shape), time_ids,
                unit_ip(tokens(jnp.broadcast_to(uncond.image.astype(image.dtype), image.shape)), layers, scale))
            keys = jax.random.wrap_key_data(items["keys"])
            shape = (latent, latent, channels)
            latents = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)
            latents = latents * jnp.float32(plan.init_noise_sigma)
            latents = denoise(model.unet, scheduler, plan, latents, guided(negative, positive),
                              guidance_scale=guidance, guidance_rescale=jnp.float32(0.0),
                              ip_window=jnp.asarray([0.0, 1.0], jnp.float32),
                              keys=jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys), cfg=True)
            return nnx.merge(vae_graphdef, vae_state).pixels_from_latents(latents).astype(jnp.float32)

        self._sample = jax.jit(sample, out_shardings=self.replicated)
        self._guidance = jnp.float32(guidance)
        self._mesh = mesh

    def __call__(self, params, frozen) -> list:
        out = []
        with jax.set_mesh(self._mesh):
            for start in range(0, self.num_items, self.batch):
                items = place(jax.tree.map(lambda x, s=start: x[s : s + self.batch], self._items),
                              self._batch_sharding)
                pixels = self._sample(params, frozen, self._vae_state, items, self._uncond, self._time_ids,
                                      self._guidance, self._scale)
                out.append(np.asarray(pixels.addressable_data(0)))
        return to_pil(np.concatenate(out)[: self.num_items])


def place(tree, sharding: NamedSharding):
    """Host arrays (the same on every process) as global arrays laid out by `sharding` (multi-host safe)."""
    return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index]), tree)


class SampleGrid:
    """``grid(params, frozen) -> PIL image``: rows are the monitor's image prompts, columns its text prompts."""

    def __init__(self, config, assembled, encoders, mesh):
        m = config.monitor
        if not m.sample_images:
            raise ConfigError("monitor.sample_every_steps is set but monitor.sample_images is empty; list image "
                              "prompt files (or set sample_every_steps=0).")
        prompts = list(m.sample_prompts) or [""]
        images = [load_image(p, what="sample image") for p in m.sample_images]
        # Row-major grid: image i, prompt p -> item i * n_p + p.
        self.columns = len(prompts)
        self._sampler = Sampler(config.model, assembled, encoders, mesh, prompts * len(images),
                                [im for im in images for _ in prompts], num_steps=m.sample_num_steps,
                                guidance=m.sample_guidance, resolution=m.sample_resolution or config.data.resolution,
                                seed=m.sample_seed)

    def __call__(self, params, frozen):
        return grid(self._sampler(params, frozen), columns=self.columns)


def write_grid(image, workdir: Path, step: int) -> Path:
    path = Path(workdir) / "samples" / f"step_{step:08d}.png"
    save_image(image, path)
    return path

"""`IPAdapterPipeline`: text-to-image, image-to-image and inpainting with image prompts, for SD1.x/2.x and
SDXL, data-parallel over every device of a mesh (parameters replicated, the batch split).

    pipe = IPAdapterPipeline.from_pretrained("runwayml/stable-diffusion-v1-5",
                                             image_encoder="h94/IP-Adapter/models/image_encoder",
                                             adapters=["h94/IP-Adapter/models/ip-adapter_sd15.safetensors"])
    images = pipe("best quality", images=["ref.png"], scale=0.6, seed=0).images

ControlNets (`controlnets=[...]` at load, `control_image=` per call) and LoRAs fused into the base
(`loras=[(path, weight)]`) work with every mode.

Image k of a call with `seed` s is exactly the image a call with seed s + k and one image would give, on any
number of devices.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ipadapter_jax import images as imaging
from ipadapter_jax.errors import UserError
from ipadapter_jax.generation import prompts, stages
from ipadapter_jax.generation.conditioning import Conditioning, guided, sdxl_time_ids
from ipadapter_jax.generation.controlnet import ControlGuidance
from ipadapter_jax.generation.image_features import image_processor_for, pixel_values
from ipadapter_jax.ip_adapter import IPAdapter, attach, check_image_encoder, merge_faceid_lora
from ipadapter_jax.models.attention import Implementation
from ipadapter_jax.models.ip_conditioning import IPConditioning
from ipadapter_jax.models.target import chip_of, platform_of, set_target
from ipadapter_jax.pipelines.components import BaseModels, load_base, load_controlnets
from ipadapter_jax.pipelines.control_inputs import control_items, control_rows, per_controlnet
from ipadapter_jax.pipelines.image_prompt import ImagePrompt, combine_features, ip_masks
from ipadapter_jax.pipelines.initial_latents import Noise, initial_latents
from ipadapter_jax.pipelines.layer_controls import adapter_controls, composition_tokens, place_controls
from ipadapter_jax.pipelines.settings import check_fits, check_generation
from ipadapter_jax.schedulers import make_scheduler
from ipadapter_jax.weights.checkpoint_files import weights_fingerprint
from ipadapter_jax.weights.controlnet import check_controlnet
from ipadapter_jax.weights.converted import ConvertedWeights
from ipadapter_jax.weights.diffusers_models import load_image_encoder
from ipadapter_jax.weights.hub import resolve_path
from ipadapter_jax.weights.ip_adapter_files import load_ip_adapter
from ipadapter_jax.weights.lora import fuse_loras
from ipadapter_jax.weights.pretrained import gc_paused


@dataclasses.dataclass
class GenerationOutput:
    images: list  # PIL images (output_type="pil"), or a (B, H, W, 3) uint8 array ("np")
    latents: np.ndarray  # final latents before decoding, diffusers' NCHW layout
    timings: dict[str, float]


class IPAdapterPipeline:
    def __init__(self, base: BaseModels, adapters: Sequence[IPAdapter] = (), *, image_encoder=None,
                 image_processor=None, mesh: Mesh | None = None, sharded_params: bool = False, controlnets=()):
        """`mesh`: the devices to split batches over (default: all). `sharded_params`: the models were loaded
        already placed (FSDP, see `from_pretrained(fsdp=...)`), so keep their placement instead of replicating.
        `controlnets`: ControlNetModels that steer the base UNet, each checked against it."""
        self.base = base
        self.adapters = list(adapters)
        self.controlnets = list(controlnets)
        for k, controlnet in enumerate(self.controlnets):
            check_controlnet(controlnet, base.unet, name=_controlnet_name(k, len(self.controlnets)))
        self.image_encoder = image_encoder
        self.image_processor = image_processor
        if any(a.spec.needs_image_encoder for a in self.adapters):
            if image_encoder is None:
                raise UserError("these IP-Adapters read CLIP image features but no image encoder was given: pass "
                                "image_encoder (e.g. h94/IP-Adapter/models/image_encoder for SD1.5 adapters, "
                                "h94/IP-Adapter/sdxl_models/image_encoder for ViT-bigG SDXL adapters).")
            for a in self.adapters:
                if a.spec.needs_image_encoder:
                    check_image_encoder(a.spec, image_encoder)
        self.mesh = mesh or Mesh(np.asarray(jax.devices()), ("data",))
        for model in (base.unet, base.vae, *base.text_encoders, image_encoder, *self.controlnets):
            if model is not None:  # kernels and layouts for the platform of the mesh's devices
                set_target(model, platform_of(self.mesh), chip=chip_of(self.mesh))
        replicated = None if sharded_params else NamedSharding(self.mesh, P())
        self._batch = NamedSharding(self.mesh, P(self.mesh.axis_names))
        self._unet = stages.Bound.of(base.unet, replicated)
        self._vae = stages.Bound.of(base.vae, replicated)
        text = [stages.Bound.of(t, replicated) for t in base.text_encoders]
        self._text_graphs = tuple(b.graphdef for b in text)
        self._text_states = tuple(b.state for b in text)
        self._encoder = stages.Bound.of(image_encoder, replicated) if image_encoder is not None else None
        small = NamedSharding(self.mesh, P())  # projections are small: always replicated
        self._projections = [stages.Bound.of(a.image_proj, small) for a in self.adapters]
        bound = [stages.Bound.of(c, replicated) for c in self.controlnets]
        self._control_graphs = tuple(b.graphdef for b in bound)
        self._control_states = tuple(b.state for b in bound)
        self.load_seconds = 0.0
        self.weights_cache: ConvertedWeights | None = None  # from_pretrained's, while it writes in the background
        self.sources: dict = {}  # what was loaded (from_pretrained): batch resume compares it

    def finish_weights_cache(self) -> bool:
        """Wait for the converted-weights cache entries this pipeline's load is still writing (a command calls it
        before it exits: the writer threads are daemons, and a process that ends first leaves no entry). Returns
        whether there was anything to wait for."""
        if self.weights_cache is None or not self.weights_cache.pending():
            return False
        print("ipadapter-jax: finishing the converted-weights cache (once per model: later loads map it)...",
              file=sys.stderr, flush=True)
        self.weights_cache.wait()
        return True

    @classmethod
    @gc_paused
    def from_pretrained(cls, base: str | Path, *, image_encoder: str | Path | None = None,
                        adapters: Sequence[str | Path] = (), dtype="float32", scheduler: str | None = None,
                        variant: str | None = None, attention_impl: Implementation = "auto",
                        revision: str | None = None, faceid_lora_scale: float = 1.0,
                        mesh: Mesh | None = None, fsdp: int = 1, controlnets: Sequence[str | Path] = (),
                        loras: Sequence[tuple[str | Path, float]] = (),
                        weights_cache: str | Path | None = None) -> IPAdapterPipeline:
        """Load a diffusers base (folder or hub id), an image encoder and IP-Adapters (official files or our
        Flax folders, local or `owner/repo/path`), computing in `dtype`.

        `controlnets`: diffusers ControlNet folders or hub ids (`lllyasviel/control_v11p_sd15_canny`), each checked
        against the base before its weights load. `loras`: (file, weight) pairs (diffusers/PEFT or kohya
        `.safetensors`, local or `owner/repo/file`) fused into the UNet and text encoders.

        `fsdp > 1` splits every weight over groups of that many devices (for models that do not fit one chip):
        the mesh becomes (data, fsdp), weights are placed split as they load, and batches use all devices.
        `weights_cache`: a folder where the base and image encoder weights are kept converted to the Flax layout,
        so that later loads map them instead of converting (`weights/converted.py`)."""
        start = time.perf_counter()
        cache = ConvertedWeights(weights_cache) if weights_cache is not None else None
        placement = None
        if fsdp > 1:
            from ipadapter_jax.sharding import MeshConfig, make_mesh, placer

            mesh = make_mesh(MeshConfig(data=-1, fsdp=fsdp), None if mesh is None else list(mesh.devices.flat))
            placement = placer(mesh)
        models = load_base(base, dtype=dtype, variant=variant, num_ip_adapters=len(adapters),
                           attention_impl=attention_impl, scheduler=scheduler, revision=revision,
                           sharding=placement, cache=cache)
        lora_files = [(resolve_path(path, what="LoRA"), float(weight)) for path, weight in loras]
        fuse_loras(models.unet, models.text_encoders, lora_files)  # checks every file before changing anything
        control_folders, control_models = load_controlnets(controlnets, models.unet, dtype=dtype,
                                                           attention_impl=attention_impl, sharding=placement)
        files = [resolve_path(a, what="IP-Adapter") for a in adapters]
        loaded = [load_ip_adapter(f, unet_config=models.unet.config, dtype=dtype) for f in files]
        attach(models.unet, loaded)
        for adapter in loaded:
            if adapter.lora:
                merge_faceid_lora(models.unet, adapter, faceid_lora_scale)
        encoder = processor = None
        if image_encoder is not None and any(a.spec.needs_image_encoder for a in loaded):
            folder = resolve_path(image_encoder, what="image encoder")
            files.append(folder)
            encoder = load_image_encoder(folder, dtype=dtype, attention_impl=attention_impl, sharding=placement,
                                         cache=cache)
            processor = image_processor_for(folder, encoder.image_size)
        pipe = cls(models, loaded, image_encoder=encoder, image_processor=processor, mesh=mesh,
                   sharded_params=placement is not None, controlnets=control_models)
        pipe.load_seconds = time.perf_counter() - start
        pipe.weights_cache = cache
        pipe.sources = {"base": str(base), "image_encoder": None if image_encoder is None else str(image_encoder),
                        "adapters": [str(a) for a in adapters], "dtype": str(dtype), "variant": variant,
                        "scheduler": scheduler, "faceid_lora_scale": faceid_lora_scale,
                        "weights": [weights_fingerprint(p) for p in (models.folder, *files)]}
        if controlnets or loras:  # only then, so that earlier batch outputs keep their settings hash
            pipe.sources.update(controlnets=[str(c) for c in controlnets],
                                loras=[[str(p), float(w)] for p, w in loras],
                                control_weights=[weights_fingerprint(p) for p in
                                                 (*control_folders, *(f for f, _ in lora_files))])
        return pipe

    # ------------------------------------------------------------------------------------------ image prompts

    def image_embeds(self, image_prompts: Sequence[ImagePrompt]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per adapter, (negative, positive) features the projection reads (N_img leading), before combining."""
        self._check_prompts(image_prompts)
        out = []
        for adapter, ip in zip(self.adapters, image_prompts, strict=True):
            spec = adapter.spec
            if ip.embeds is not None:
                out.append((np.asarray(ip.embeds[0]), np.asarray(ip.embeds[1])))
                continue
            if not spec.needs_image_encoder:
                out.append((np.zeros((ip.num_images, 0), np.float32), np.zeros((ip.num_images, 0), np.float32)))
                continue
            if not ip.images:
                raise UserError(f"the {spec.variant} IP-Adapter in slot {self.adapters.index(adapter)} needs "
                                "reference images (or precomputed embeddings).")
            encode = partial(stages.image_features, self._encoder.graphdef, self._encoder.state, spec)
            pixels = jnp.asarray(pixel_values(self.image_processor, ip.loaded_images()))
            features = encode(pixels)
            negative_images = ip.unconditional_images()  # negative images or negative noise
            if negative_images:
                negative_pixels = pixel_values(self.image_processor, negative_images)
                if negative_pixels.shape[0] not in (1, pixels.shape[0]):
                    raise UserError(f"give one negative image or one per reference image ({pixels.shape[0]}), "
                                    f"not {negative_pixels.shape[0]}.")
                negative = encode(jnp.asarray(np.broadcast_to(negative_pixels, pixels.shape)))
            else:
                negative = encode(pixels, True)
            out.append((np.asarray(negative), np.asarray(features)))
        return out

    def image_tokens(self, image_prompts: Sequence[ImagePrompt], embeds=None) -> list[tuple[jax.Array, jax.Array]]:
        """Per adapter, (negative, positive) tokens (1, N, T, C) after combining the reference images."""
        embeds = embeds if embeds is not None else self.image_embeds(image_prompts)
        tokens = []
        for a, (adapter, ip, (negative, positive)) in enumerate(zip(self.adapters, image_prompts, embeds,
                                                                    strict=True)):
            spec = adapter.spec
            face = neg_face = None
            if spec.needs_face_embeds:
                if ip.face_embeds is None:
                    raise UserError(f"the {spec.variant} IP-Adapter in slot {a} needs face embeddings "
                                    "(InsightFace normed_embedding, 512 values per face, e.g. a .npy file).")
                face = np.atleast_2d(np.asarray(ip.face_embeds, np.float32))
                if face.shape[-1] != spec.face_embed_dim:
                    raise UserError(f"face embeddings have {face.shape[-1]} values but the {spec.variant} adapter "
                                    f"expects {spec.face_embed_dim} (InsightFace buffalo_l normed_embedding).")
                face = combine_features(face, ip.combine)
                neg_face = np.zeros_like(face)
            pair = []
            for feats, face_embeds in ((negative, neg_face), (positive, face)):
                f = combine_features(feats, ip.combine)[None] if spec.needs_image_encoder else None
                fe = None if face_embeds is None else jnp.asarray(face_embeds)[None]
                pair.append(stages.image_tokens(self._projections[a].graphdef, self._projections[a].state, spec,
                                                None if f is None else jnp.asarray(f), fe, ip.shortcut,
                                                jnp.float32(ip.shortcut_scale)))
            tokens.append(tuple(pair))
        return tokens

    def _check_prompts(self, image_prompts):
        if len(image_prompts) != len(self.adapters):
            raise UserError(f"{len(self.adapters)} IP-Adapters are loaded but {len(image_prompts)} image prompts were "
                            "given; pass one image (or list of images) per adapter.")

    # ----------------------------------------------------------------------------------------------- generate

    def __call__(self, prompt: str | list[str] = "", *, images: Sequence | None = None,
                 negative_prompt: str | list[str] | None = None, scale=1.0, num_inference_steps: int = 30,
                 guidance_scale: float = 7.5, guidance_rescale: float = 0.0, height: int | None = None,
                 width: int | None = None, num_images_per_prompt: int = 1, seed: int = 0,
                 latents: np.ndarray | None = None, init_image=None, strength: float | None = None,
                 mask_image=None, ip_window: tuple[float, float] = (0.0, 1.0), eta: float = 0.0,
                 scheduler: str | None = None, original_size: tuple[int, int] | None = None,
                 crops_coords_top_left: tuple[int, int] = (0, 0), embeds=None, output_type: str = "pil",
                 noise: Noise | None = None, control_image=None, control_scale=1.0, control_start=0.0,
                 control_end=1.0, guess_mode: bool = False) -> GenerationOutput:
        """Generate. `images`: per adapter an image, a list of images or an `ImagePrompt`; plain images take
        `scale`. `init_image` makes it image-to-image (`strength`, default 0.8), plus `mask_image` inpainting
        (white = repaint; default strength 1.0). `latents`: initial noise in diffusers' NCHW layout.

        ControlNets: `control_image` per ControlNet (one image, or one per prompt; a bare image with one
        ControlNet); `control_scale`, `control_start` and `control_end` once for all or per ControlNet (the window
        in fractions of the steps); `guess_mode` runs them on the conditional branch only. Without height and
        width, text-to-image takes the first control image's size."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        check_generation(steps=num_inference_steps, guidance=guidance_scale, guidance_rescale=guidance_rescale,
                         eta=eta, strength=strength, ip_window=ip_window, num_images=num_images_per_prompt, seed=seed)
        prompts_list = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts_list) * num_images_per_prompt
        positive = [p for p in prompts_list for _ in range(num_images_per_prompt)]
        if negative_prompt is None or isinstance(negative_prompt, str):
            negative = None if negative_prompt is None else [negative_prompt] * batch
        else:
            negative = [n for n in negative_prompt for _ in range(num_images_per_prompt)]
        image_prompts = [i if isinstance(i, ImagePrompt) else ImagePrompt(images=i, scale=scale)
                         for i in (images or [])]
        init = imaging.load_image(init_image, what="init image") if init_image is not None else None
        control = control_items(control_image, len(self.controlnets), len(prompts_list), num_images_per_prompt)
        if height is None or width is None:
            sized = init if init is not None else (control[0][0] if control else None)
            if sized is not None:
                f = self.base.vae_scale_factor
                width, height = width or sized.width - sized.width % f, height or sized.height - sized.height % f
            else:
                height, width = height or self.base.default_size, width or self.base.default_size
        imaging.check_size(height, width, self.base.vae_scale_factor)
        self.check_fits(batch, height, width)
        shape = (height // self.base.vae_scale_factor, width // self.base.vae_scale_factor,
                 self.base.vae.config.latent_channels)
        noise = noise or Noise.from_seeds([seed + k for k in range(batch)], shape)
        if latents is not None:
            given = np.asarray(latents, np.float32)
            if not np.isfinite(given).all():
                raise UserError("the initial latents hold NaN or infinite values; pass finite noise.")
            if given.shape != (batch, shape[2], shape[0], shape[1]):
                raise UserError(f"initial latents must have shape {(batch, shape[2], shape[0], shape[1])} (NCHW, "
                                f"batch {batch}, {height}x{width} image), not {given.shape}.")
            noise = dataclasses.replace(noise, latents=given.transpose(0, 2, 3, 1))
        if mask_image is not None and init is None:
            raise UserError("inpainting needs init_image as well as mask_image.")
        if strength is None:
            strength = 1.0 if (mask_image is not None or init is None) else 0.8
        if not 0.0 < strength <= 1.0:
            raise UserError(f"strength must be in (0, 1], not {strength}.")
        if init is None and strength != 1.0:
            raise UserError("strength applies to image-to-image and inpainting; pass init_image.")
        timings["prepare_s"] = time.perf_counter() - start

        out = self.generate_batch(
            positive, negative, image_prompts, noise=noise, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, height=height, width=width,
            init=init, mask=mask_image, strength=strength, ip_window=ip_window, eta=eta, scheduler=scheduler,
            original_size=original_size, crops_coords_top_left=crops_coords_top_left, embeds=embeds,
            decode=output_type != "latent", timings=timings, control=control, control_scale=control_scale,
            control_start=control_start, control_end=control_end, guess_mode=guess_mode)
        pixels, final = out
        result_latents = np.asarray(final).transpose(0, 3, 1, 2)
        if output_type == "latent":
            return GenerationOutput(images=[], latents=result_latents, timings=timings)
        uint8 = imaging.to_uint8(np.asarray(pixels))
        images_out = [imaging.Image.fromarray(a) for a in uint8] if output_type == "pil" else uint8
        timings["total_s"] = time.perf_counter() - start
        return GenerationOutput(images=images_out, latents=result_latents, timings=timings)

    def check_fits(self, batch: int, height: int, width: int) -> None:
        """Refuse, before any work, a batch whose decoder activations cannot fit on a device (settings.py)."""
        rows = batch // self.mesh.size if batch % self.mesh.size == 0 else batch  # as `_place` splits them
        vae = self.base.vae
        check_fits(rows, height, width, vae.config.block_out_channels[0], np.dtype(vae.dtype).itemsize,
                   self.mesh.devices.flat[0])

    def _place(self, x, count: int):
        """Put a batch-leading array on the mesh, split over its devices when the batch divides evenly.
        Built from host data with `make_array_from_callback`, which also holds across several processes."""
        if x is None:
            return None
        sharding = self._batch if count % self.mesh.size == 0 else NamedSharding(self.mesh, P())
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        host = np.asarray(x) if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else None
        if host is None:  # typed PRNG keys stay device arrays
            return jax.device_put(x, sharding)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    def generate_batch(self, positive: list[str], negative: list[str] | None, image_prompts: list[ImagePrompt], *,
                       noise: Noise, num_inference_steps: int, guidance_scale: float, guidance_rescale: float,
                       height: int, width: int, init=None, mask=None, strength: float = 1.0,
                       ip_window=(0.0, 1.0), eta: float = 0.0, scheduler: str | None = None,
                       original_size=None, crops_coords_top_left=(0, 0), embeds=None, decode: bool = True,
                       timings: dict | None = None, per_item: list[list[ImagePrompt]] | None = None,
                       control: list | None = None, control_scale=1.0, control_start=0.0, control_end=1.0,
                       guess_mode: bool = False):
        """One compiled batch of B prompts: the image prompts are shared, or given `per_item`; guidance may be
        one value per item. `control`: per ControlNet one image for all items or one per item; `control_scale`
        per ControlNet (or once) a value or one per item; start/end per ControlNet or once. Returns (pixels or
        None, final latents)."""
        with jax.set_mesh(self.mesh):  # the mesh that kernels deep in the models are split over
            return self._generate_batch(positive, negative, image_prompts, noise=noise,
                                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                        guidance_rescale=guidance_rescale, height=height, width=width, init=init,
                                        mask=mask, strength=strength, ip_window=ip_window, eta=eta,
                                        scheduler=scheduler, original_size=original_size,
                                        crops_coords_top_left=crops_coords_top_left, embeds=embeds, decode=decode,
                                        timings=timings, per_item=per_item, control=control,
                                        control_scale=control_scale, control_start=control_start,
                                        control_end=control_end, guess_mode=guess_mode)

    def _generate_batch(self, positive, negative, image_prompts, *, noise, num_inference_steps, guidance_scale,
                        guidance_rescale, height, width, init, mask, strength, ip_window, eta, scheduler,
                        original_size, crops_coords_top_left, embeds, decode, timings, per_item, control,
                        control_scale, control_start, control_end, guess_mode):
        timings = {} if timings is None else timings
        base = self.base
        batch = len(positive)
        guidance = np.broadcast_to(np.asarray(guidance_scale, np.float32), (batch,))
        rescale = np.broadcast_to(np.asarray(guidance_rescale, np.float32), (batch,))
        cfg = bool(np.any(guidance > 1.0))
        sched = base.scheduler if scheduler is None else make_scheduler(scheduler, base.scheduler_config)
        plan = sched.plan(num_inference_steps, strength=strength, eta=eta)
        controls = self._control_guidance(control, control_scale, control_start, control_end, guess_mode, batch,
                                          height, width, plan.num_steps)

        t0 = time.perf_counter()
        context, pooled = self._encode_text(positive)
        if cfg and negative is None and base.is_xl and base.force_zeros_for_empty_prompt:
            neg_context, neg_pooled = jnp.zeros_like(context), jnp.zeros_like(pooled)
        elif cfg:
            neg_context, neg_pooled = self._encode_text(negative or [""] * batch)
        time_ids = (jnp.asarray(sdxl_time_ids(batch, height, width, original_size, crops_coords_top_left))
                    if base.is_xl else None)
        timings["text_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        ip = self._ip_conditioning(image_prompts, batch, height, width, embeds, per_item)
        cond = Conditioning(context, pooled, time_ids, None if ip is None else ip[1])
        if cfg:
            cond = guided(Conditioning(neg_context, neg_pooled, time_ids, None if ip is None else ip[0]), cond)
        timings["image_prompt_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        latents, inpaint = initial_latents(self._vae, self._place, base.unet.config.in_channels, sched, plan, noise,
                                           batch, height, width, init, mask, strength)
        cond = self._place_conditioning(cond)
        final = stages.run_denoise(self._unet.graphdef, self._unet.state, sched, plan,
                                   self._place(latents, batch), cond, self._place(guidance, batch),
                                   self._place(rescale, batch), jnp.asarray(ip_window, jnp.float32),
                                   self._place(noise.keys, batch), cfg, inpaint, **controls)
        final = jax.block_until_ready(final)
        timings["denoise_s"] = time.perf_counter() - t0
        if not decode:
            return None, final
        t0 = time.perf_counter()
        pixels = jax.block_until_ready(stages.vae_decode(self._vae.graphdef, self._vae.state, final))
        timings["decode_s"] = time.perf_counter() - t0
        return pixels, final

    def _control_guidance(self, control, scale, start, end, guess_mode: bool, batch: int, height: int, width: int,
                          num_steps: int) -> dict:
        """run_denoise's ControlNet arguments: the ControlNets' halves and their traced images, per-item scales
        and keep-table (diffusers' guess mode also follows the first ControlNet's `global_pool_conditions`)."""
        n = len(self.controlnets)
        if (control is None) != (n == 0):
            raise UserError(f"{n} ControlNet(s) are loaded; pass a control image per ControlNet." if n else
                            "control images were given but no ControlNet is loaded; pass controlnets.")
        if not n:
            return {}
        pixels, scales, keep = control_rows(
            per_controlnet(control, n, "control images", once=False), per_controlnet(scale, n, "control_scale"),
            per_controlnet(start, n, "control_start"), per_controlnet(end, n, "control_end"), batch=batch,
            height=height, width=width, num_steps=num_steps)
        guess = bool(guess_mode) or self.controlnets[0].config.global_pool_conditions
        guidance = ControlGuidance(images=tuple(self._place(p, batch) for p in pixels),
                                   scales=tuple(self._place(s, batch) for s in scales), keep=jnp.asarray(keep),
                                   guess_mode=guess)
        return dict(control_graphs=self._control_graphs, control_states=self._control_states, control=guidance)

    def _encode_text(self, texts: list[str]) -> tuple[jax.Array, jax.Array | None]:
        ids = prompts.tokenize_all(self.base.tokenizers, texts)
        return stages.encode_text(self._text_graphs, self._text_states,
                                  tuple(self._place(i, len(texts)) for i in ids))

    def _place_conditioning(self, cond: Conditioning) -> Conditioning:
        """Per-row arrays split over the mesh like the batch; scales and masks stay as they are (shared)."""
        rows = cond.context.shape[0]
        ip = cond.ip and dataclasses.replace(cond.ip, tokens=tuple(self._place(t, rows) for t in cond.ip.tokens),
                                             controls=place_controls(cond.ip.controls, lambda t: self._place(t, rows)))
        return Conditioning(self._place(cond.context, rows), self._place(cond.pooled, rows),
                            self._place(cond.time_ids, rows), ip)

    def _ip_conditioning(self, image_prompts, batch: int, height: int, width: int, embeds,
                         per_item: list[list[ImagePrompt]] | None = None
                         ) -> tuple[IPConditioning, IPConditioning] | None:
        """(negative, positive) IP tokens, scales and masks for the batch: shared image prompts, or one list of
        them per item."""
        if not self.adapters:
            if image_prompts or per_item:
                raise UserError("image prompts were given but no IP-Adapter is loaded; pass adapters.")
            return None
        if per_item is None:
            if not image_prompts:
                raise UserError(f"{len(self.adapters)} IP-Adapter(s) are loaded; pass images (one entry per adapter).")
            self._check_prompts(image_prompts)
            pairs = self.image_tokens(image_prompts, embeds)
            rows = [[(jnp.broadcast_to(neg, (batch, *neg.shape[1:])), jnp.broadcast_to(pos, (batch, *pos.shape[1:])))
                     for neg, pos in pairs]]
            prompts_by_item = [image_prompts]
        else:
            if len(per_item) != batch:
                raise ValueError(f"{len(per_item)} image-prompt lists for a batch of {batch}")
            rows = [self.image_tokens(item) for item in per_item]
            prompts_by_item = per_item
        compositions = [composition_tokens(self, item) for item in prompts_by_item]
        negatives, positives, scales, masks, neg_controls, pos_controls = [], [], [], [], [], []
        for a in range(len(self.adapters)):
            neg = jnp.concatenate([row[a][0] for row in rows])
            pos = jnp.concatenate([row[a][1] for row in rows])
            if len({(p.shape[1:]) for p in (neg, pos)}) != 1:
                raise UserError(f"adapter {a}: every item of a batch needs the same number of reference images.")
            negatives.append(neg)
            positives.append(pos)
            first = prompts_by_item[0][a]
            n_images = pos.shape[1]
            if first.masks and len(first.masks) != n_images:
                raise UserError(f"give one mask per reference image: {n_images} images, {len(first.masks)} masks.")
            n_masked = n_images if first.masks else None
            scale, neg_control, pos_control = adapter_controls(  # weights, weight types, embeds scaling, swaps
                [item[a] for item in prompts_by_item], [row[a] for row in rows], [c[a] for c in compositions],
                self.base.unet.config, n_masked)
            scales.append(scale)
            neg_controls.append(neg_control)
            pos_controls.append(pos_control)
            masks.append(jnp.asarray(ip_masks(first.masks, height, width)) if first.masks else None)
        scales, masks = tuple(scales), tuple(masks)
        return (IPConditioning(tokens=tuple(negatives), scales=scales, masks=masks, controls=tuple(neg_controls)),
                IPConditioning(tokens=tuple(positives), scales=scales, masks=masks, controls=tuple(pos_controls)))


def _controlnet_name(k: int, n: int) -> str:
    return "the ControlNet" if n == 1 else f"ControlNet {k + 1} of {n}"

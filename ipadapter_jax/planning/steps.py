"""The programs a plan compiles, built abstractly (no weights, no arrays): the jitted training step that
`train` runs (`training.step.make_train_step` with `training/loop.py`'s shardings and donation) and the
denoising loop that batch generation runs (`generation.stages.run_denoise`), each lowered from
`ShapeDtypeStruct`s that carry `NamedSharding`s on the target's devices, under that mesh."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ipadapter_jax import sharding as sharding_lib
from ipadapter_jax.errors import ConfigError
from ipadapter_jax.generation import stages
from ipadapter_jax.generation.conditioning import Conditioning
from ipadapter_jax.models.adapter_spec import IMAGE_EMBEDS, make_spec
from ipadapter_jax.models.image_proj import build_image_proj
from ipadapter_jax.models.ip_conditioning import IPConditioning
from ipadapter_jax.models.layers import IPAdapterParam, abstract_model
from ipadapter_jax.models.remat import set_remat
from ipadapter_jax.models.target import chip_of, platform_of, set_target
from ipadapter_jax.models.unet import UNet2DConditionModel
from ipadapter_jax.planning.bases import BaseArchitecture
from ipadapter_jax.schedulers import alphas_cumprod_for_config, make_scheduler
from ipadapter_jax.training import loss as loss_lib
from ipadapter_jax.training import model as model_lib
from ipadapter_jax.training import step as step_lib
from ipadapter_jax.training.config import TrainConfig
from ipadapter_jax.weights.pretrained import as_dtype


@dataclasses.dataclass
class Program:
    """A jitted function and its abstract arguments, to be lowered under `mesh`."""

    name: str
    jitted: Any
    args: tuple
    mesh: Mesh
    items_per_step: int  # training examples or generated images one call handles
    unet_calls: int  # UNet evaluations per call (denoising steps; 1 for training)
    # Training: (loss(params, frozen, consts, microbatch, key), its abstract arguments), the function the step
    # differentiates, for counting the activations its backward pass keeps (planning/search.py).
    loss: tuple | None = None

    def lower(self):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*self.args)


def slice_mesh(devices: list, data: int, fsdp: int) -> Mesh:
    """A (data, fsdp) mesh over a slice's devices, placed on its torus where jax knows how."""
    from jax.experimental import mesh_utils

    shape = sharding_lib.axis_sizes(sharding_lib.MeshConfig(data=data, fsdp=fsdp), len(devices))
    try:  # ICI-aware placement of the axes on the slice's torus
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, sharding_lib.AXES)


def _sds(x, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def _abstract_unet(base: BaseArchitecture, *, dtype, attention: str, remat: str | None, mesh: Mesh,
                   num_ip_adapters: int = 1) -> UNet2DConditionModel:
    platform = platform_of(mesh)
    unet = abstract_model(lambda: UNet2DConditionModel(base.unet, num_ip_adapters=num_ip_adapters,
                                                       attention_impl=attention, platform=platform, dtype=dtype,
                                                       rngs=nnx.Rngs(0)))
    set_target(unet, platform, chip=chip_of(mesh))  # as train and batch build theirs
    if remat:
        set_remat(unet, remat)
    return unet


def train_program(config: TrainConfig, base: BaseArchitecture, encoder, mesh: Mesh) -> Program:
    """The training step of `config` on `mesh`, for a run reading the encoder cache (the step of a run with
    `data.cache`; a raw-image run's step adds the VAE and CLIP encoders in front of the same UNet)."""
    gbs, accum = config.global_batch_size, config.optimizer.grad_accum_steps
    if gbs // accum % mesh.size:
        raise ConfigError(f"The microbatch ({gbs} / {accum} accumulation steps) must split evenly over the "
                          f"{mesh.size} chips; set global_batch_size to a multiple of {mesh.size * accum}.")
    m = config.model
    unet = _abstract_unet(base, dtype=as_dtype(m.dtype), attention=m.attention, remat=m.remat, mesh=mesh)
    spec = model_lib.adapter_spec(m, base.unet, encoder)
    adapter_dtype = as_dtype(m.adapter_dtype)
    proj = abstract_model(lambda: build_image_proj(spec, dtype=adapter_dtype, rngs=nnx.Rngs(0)))
    model = model_lib.TrainModel(unet, proj)
    graphdef, trainable_state, frozen_state = nnx.split(model, IPAdapterParam, ...)
    trainable = {k: jax.ShapeDtypeStruct(v.shape, adapter_dtype) for k, v in model_lib.flatten(trainable_state).items()}
    frozen = model_lib.flatten(frozen_state)
    rules = config.mesh.rules
    assembled = model_lib.Assembled(graphdef=graphdef, trainable=trainable, frozen=frozen,
                                    trainable_paths=model_lib.flat_paths(trainable_state),
                                    frozen_paths=model_lib.flat_paths(frozen_state), spec=spec, info=None,
                                    image_size=encoder.image_size)
    replicated = sharding_lib.replicated(mesh)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    param_shardings = sharding_lib.tree_shardings(trainable, rules, mesh)
    frozen_shardings = sharding_lib.tree_shardings(frozen, rules, mesh)

    tx, schedule = step_lib.make_optimizer(config.optimizer, config.total_steps)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = jax.eval_shape(tx.init, trainable)
    opt_shardings = sharding_lib.like_params(opt_state, param_shardings, mesh)
    key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    state = {"params": {k: _sds(v, param_shardings[k]) for k, v in trainable.items()},
             "opt_state": jax.tree.map(_sds, opt_state, opt_shardings),
             "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
             "rng": _sds(key_data, replicated)}
    state_shardings = jax.tree.map(lambda x: x.sharding, state)

    alphas = alphas_cumprod_for_config(base.scheduler)
    ctx = base.unet.context_dim
    image = (spec.image_feature_dim,) if spec.image_feature == IMAGE_EMBEDS else (
        encoder.num_positions, encoder.hidden_size)
    f32 = jnp.float32
    uncond = loss_lib.Unconditional(text=jax.ShapeDtypeStruct((base.text_length, ctx), f32, sharding=replicated),
                                    image=jax.ShapeDtypeStruct(image, f32, sharding=replicated),
                                    pooled=jax.ShapeDtypeStruct((base.pooled_dim,), f32, sharding=replicated)
                                    if base.is_xl else None)
    consts = {"alphas_cumprod": jax.ShapeDtypeStruct(alphas.shape, f32, sharding=replicated), "uncond": uncond}
    latent = config.data.resolution // base.vae_scale_factor
    shapes = {"moments": ((latent, latent, 2 * base.latent_channels), f32),
              "text": ((base.text_length, ctx), f32), "image": (image, f32),
              "drop_image": ((), jnp.bool_), "drop_text": ((), jnp.bool_), "record_index": ((), jnp.int32)}
    if base.is_xl:
        shapes.update(pooled=((base.pooled_dim,), f32), time_ids=((6,), f32))
    batch = {k: jax.ShapeDtypeStruct((gbs, *shape), dt, sharding=batch_sharding) for k, (shape, dt) in shapes.items()}

    loss_settings = loss_lib.loss_settings(
        config.loss, base.prediction_type, int(alphas.shape[0]),
        (("scaling_factor", base.vae_scaling_factor), ("shift_factor", None), ("latents_mean", None),
         ("latents_std", None)))
    settings = step_lib.StepSettings(spec=spec, loss=loss_settings, cached=True, remat=m.remat,
                                     grad_accum_steps=accum)
    step_fn = step_lib.make_train_step(assembled.merge, tx, schedule, settings, batch_sharding)
    jitted = jax.jit(step_fn, in_shardings=(state_shardings, frozen_shardings, replicated, batch_sharding),
                     out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    frozen_args = {k: _sds(v, frozen_shardings[k]) for k, v in frozen.items()}
    loss = step_lib.make_microbatch_loss(assembled.merge, settings)
    microbatch = {k: jax.ShapeDtypeStruct((gbs // accum, *v.shape[1:]), v.dtype, sharding=batch_sharding)
                  for k, v in batch.items()}
    step_key = jax.eval_shape(lambda: jax.random.key(0))
    loss_args = (state["params"], frozen_args, consts, microbatch, step_key)
    return Program("train step", jitted, (state, frozen_args, consts, batch), mesh, items_per_step=gbs,
                   unet_calls=1, loss=(loss, loss_args))


@dataclasses.dataclass(frozen=True)
class GenerateSettings:
    height: int
    width: int
    steps: int = 30
    guidance: float = 7.5
    batch_per_chip: int = 1
    dtype: str = "bfloat16"
    adapter: str | None = "plus"  # an IP-Adapter variant (base, plus, full, ...), or None for none
    num_tokens: int | None = None
    scheduler: str = "ddim"
    attention: str = "auto"
    fsdp: int = 1


def generate_program(s: GenerateSettings, base: BaseArchitecture, encoder, mesh: Mesh) -> Program:
    """`generation.stages.run_denoise` for `batch_per_chip` images on every chip of `mesh` (classifier-free
    guidance doubles the UNet batch), weights replicated, or split over `fsdp` as `--fsdp` loads them."""

    f = base.vae_scale_factor
    if s.height % f or s.width % f:
        raise ConfigError(f"height and width must be multiples of {f}, not {s.height}x{s.width}.")
    dtype = as_dtype(s.dtype)
    n_adapters = 1 if s.adapter else 0
    unet = _abstract_unet(base, dtype=dtype, attention=s.attention, remat=None, mesh=mesh,
                          num_ip_adapters=n_adapters)
    graphdef, state = nnx.split(unet)
    flat, paths = model_lib.flatten(state), model_lib.flat_paths(state)
    if s.fsdp > 1:  # as `--fsdp N` loads them: split by the default rules
        placed = sharding_lib.tree_shardings(flat, sharding_lib.DEFAULT_RULES, mesh)
    else:
        placed = {k: NamedSharding(mesh, P()) for k in flat}
    state = model_lib.unflatten({k: _sds(v, placed[k]) for k, v in flat.items()}, paths)
    cfg = s.guidance > 1.0
    batch = s.batch_per_chip * mesh.size
    rows = 2 * batch if cfg else batch
    split = NamedSharding(mesh, P(mesh.axis_names))
    replicated = NamedSharding(mesh, P())
    f32 = jnp.float32
    latents = jax.ShapeDtypeStruct((batch, s.height // f, s.width // f, base.latent_channels), f32, sharding=split)
    ip = None
    if n_adapters:

        feature_dim = encoder.projection_dim if s.adapter == "base" else encoder.hidden_size
        spec = make_spec(s.adapter, base.unet, image_feature_dim=feature_dim, num_tokens=s.num_tokens)
        tokens = jax.ShapeDtypeStruct((rows, 1, spec.num_tokens, base.unet.context_dim), dtype, sharding=split)
        scales = jax.ShapeDtypeStruct((unet.num_ip_layers,), f32, sharding=replicated)
        ip = IPConditioning(tokens=(tokens,), scales=(scales,), masks=(None,))
    context = jax.ShapeDtypeStruct((rows, base.text_length, base.unet.context_dim), dtype, sharding=split)
    pooled = time_ids = None
    if base.is_xl:
        pooled = jax.ShapeDtypeStruct((rows, base.pooled_dim), dtype, sharding=split)
        time_ids = jax.ShapeDtypeStruct((rows, 6), f32, sharding=split)
    cond = Conditioning(context=context, pooled=pooled, time_ids=time_ids, ip=ip)
    sched = make_scheduler(s.scheduler, base.scheduler)
    plan = sched.plan(s.steps)
    plan = jax.tree.map(lambda x: _sds(np.asarray(x), replicated), plan)
    per_item = jax.ShapeDtypeStruct((batch,), f32, sharding=split)
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
    keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=split)
    window = jax.ShapeDtypeStruct((2,), f32, sharding=replicated)
    args = (graphdef, state, sched, plan, latents, cond, per_item, per_item, window, keys, cfg, None)
    return Program("denoise loop", stages.run_denoise, args, mesh, items_per_step=batch, unet_calls=plan.num_steps)

"""Training the shapes world's base text-to-image UNet (for this toy world only; real bases are never
trained here): the frozen exact VAE and text encoder encode the whole dataset once, then an AdamW loop fits
the UNet's prediction (`ddpm_add_noise`, the scheduler config's prediction type; timesteps uniform, or for
`high_noise_share` of each batch from `high_noise_from` up). Each sample's caption is the scene described with
a uniformly random subset of its colour, background and quadrant named beside the shape (`scenes.describe`:
from "a circle" to "a red circle on blue at top left"), so that the base follows each of them when named and
draws them at random when not; 10% of captions are dropped to the empty prompt so that classifier-free
guidance works. Writes `unet/diffusion_pytorch_model.safetensors`.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from ipadapter_jax.data.transforms import load_tokenizer
from ipadapter_jax.generation.prompts import encode as encode_text
from ipadapter_jax.generation.prompts import tokenize
from ipadapter_jax.models.unet import UNet2DConditionModel
from ipadapter_jax.models.unet_config import UNetConfig
from ipadapter_jax.schedulers import alphas_cumprod_for_config, ddpm_add_noise, training_target
from ipadapter_jax.weights.diffusers_models import load_text_encoder, load_unet, load_vae
from ipadapter_jax.weights.pretrained import read_config
from ipadapter_jax.weights.safetensors_io import save_safetensors
from ipadapter_jax.weights.torch_layout import export_state
from ipadapter_jax.world.scenes import NAMEABLE, Scene, describe, render


@dataclasses.dataclass(frozen=True)
class BaseTrainConfig:
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    p_drop_text: float = 0.1
    # This share of each batch draws its timesteps from [high_noise_from, T) instead of [0, T): the caption decides
    # colours and positions only at high noise, so uniform timesteps leave the text path little to learn from.
    high_noise_share: float = 0.0
    high_noise_from: int = 600
    seed: int = 0
    dtype: str = "float16"  # of the written weights (training is float32)
    # A second stage resumed from the written weights (fresh AdamW state, seed + 1), 0 for none.
    continue_steps: int = 0
    continue_lr: float = 1e-3
    continue_warmup_steps: int = 20

    def second_stage(self) -> BaseTrainConfig:
        return dataclasses.replace(self, steps=self.continue_steps, lr=self.continue_lr,
                                   warmup_steps=self.continue_warmup_steps, seed=self.seed + 1, continue_steps=0)


SUBSETS = tuple(frozenset(c) for r in range(len(NAMEABLE) + 1) for c in itertools.combinations(NAMEABLE, r))


def encode_dataset(folder: Path, scenes: list[Scene]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(latents (N, h, w, C) scaled, contexts (M, L, D) of the M distinct descriptions, caption index (N, S) into
    them for every scene and subset in `SUBSETS`, the empty prompt's context (L, D))."""

    vae = load_vae(folder / "vae")
    text = load_text_encoder(folder / "text_encoder")
    tokenizer = load_tokenizer(str(folder / "tokenizer"))
    pixels = np.stack([np.asarray(render(s), np.float32) / 127.5 - 1.0 for s in scenes])
    latents = np.asarray(jax.jit(lambda v, x: v.latents_from_pixels(x))(vae, jnp.asarray(pixels)))
    described = [[describe(s, named) for named in SUBSETS] for s in scenes]
    captions = sorted({c for row in described for c in row}) + [""]
    encode = jax.jit(lambda t, i: encode_text((t,), (i,))[0])
    contexts = np.concatenate([np.asarray(encode(text, tokenize(tokenizer, captions[i : i + 256])))
                               for i in range(0, len(captions), 256)])
    index = {c: i for i, c in enumerate(captions)}
    return latents, contexts[:-1], np.array([[index[c] for c in row] for row in described], np.int32), contexts[-1]


def train_base_unet(folder: str | Path, scenes: list[Scene], config: BaseTrainConfig = BaseTrainConfig(), *,
                    resume: bool = False, progress: bool = True) -> dict:
    """Train `folder/unet` (config.json already there) on `scenes`, from a random init or (`resume`) from the
    weights already there; returns a summary."""

    folder = Path(folder)
    start = time.perf_counter()
    latents, contexts, described, empty = encode_dataset(folder, scenes)
    scheduler = read_config(folder / "scheduler", "scheduler_config.json")
    alphas = jnp.asarray(alphas_cumprod_for_config(scheduler))
    prediction_type = scheduler.get("prediction_type", "epsilon")
    if resume:
        unet = load_unet(folder / "unet")
    else:
        unet = UNet2DConditionModel(UNetConfig.from_dict(read_config(folder / "unet")), rngs=nnx.Rngs(config.seed))
    graphdef, params = nnx.split(unet)
    schedule = optax.join_schedules([optax.linear_schedule(0.0, config.lr, config.warmup_steps),
                                     optax.cosine_decay_schedule(config.lr, config.steps, alpha=0.05)],
                                    [config.warmup_steps])
    tx = optax.adamw(schedule, weight_decay=1e-2)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = tx.init(params)
    data = (jnp.asarray(latents), jnp.asarray(contexts), jnp.asarray(empty), jnp.asarray(described))

    def loss_fn(params, x0, context, key):
        k_noise, k_t, k_drop = jax.random.split(key, 3)
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        high = jnp.arange(x0.shape[0]) < round(config.high_noise_share * x0.shape[0])
        t = jax.random.randint(k_t, (x0.shape[0],), jnp.where(high, config.high_noise_from, 0), alphas.shape[0],
                               jnp.int32)
        drop = jax.random.uniform(k_drop, (x0.shape[0], 1, 1)) < config.p_drop_text
        context = jnp.where(drop, data[2][None], context)
        pred = nnx.merge(graphdef, params)(ddpm_add_noise(alphas, x0, noise, t), t, context)
        return jnp.mean(jnp.square(pred - training_target(prediction_type, alphas, x0, noise, t)))

    @jax.jit
    def step(params, opt_state, i):
        key = jax.random.fold_in(jax.random.key(config.seed), i)
        rows = jax.random.randint(jax.random.fold_in(key, 1 << 30), (config.batch_size,), 0, data[0].shape[0])
        subset = jax.random.randint(jax.random.fold_in(key, 1 << 29), (config.batch_size,), 0, len(SUBSETS))
        context = data[1][data[3][rows, subset]]
        loss, grads = jax.value_and_grad(loss_fn)(params, data[0][rows], context, key)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    bar = tqdm(range(config.steps), desc="world base UNet", unit="step", disable=not progress)
    for i in bar:
        params, opt_state, loss = step(params, opt_state, jnp.int32(i))
        if i % 100 == 99 or i == config.steps - 1:
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    weights = export_state(params, dtype=np.dtype(config.dtype))
    save_safetensors(weights, folder / "unet" / "diffusion_pytorch_model.safetensors")
    return {"steps": config.steps, "batch_size": config.batch_size, "images": len(scenes),
            "final_loss": losses[-1] if losses else None, "seconds": time.perf_counter() - start}

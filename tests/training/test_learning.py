"""Proof of learning: on a tiny frozen base and a synthetic dataset whose training targets depend on the image
prompt, the adapter's loss falls well below that of the same run with the image always dropped.

The data make the image prompt informative about the target: flat-colour images, a VAE made deterministic
(posterior log-variance -20, so a latent is a function of its image) and scaled to unit-size latents, and
v-prediction at mid noise levels, whose target -sqrt(1 - a) x0 + sqrt(a) noise has an image-determined part.
Text is always dropped in both runs, so the image is the only prompt. Both runs see the same batches, noise
and timesteps (one compiled step, the drops are data); only drop_image differs.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from training.helpers import make_config

from ipadapter_jax.data import tfds_builder
from ipadapter_jax.sharding import MeshConfig, make_mesh
from ipadapter_jax.training import loss as loss_lib
from ipadapter_jax.training import step as step_lib
from ipadapter_jax.training.encoder_cache import CacheSource, build_encoder_cache, load_unconditional
from ipadapter_jax.training.model import build_model
from ipadapter_jax.weights.safetensors_io import SafetensorsFile, save_safetensors

STEPS, BATCH, LAST = 150, 16, 30
LR = 2e-2


def _informative_base(src, dst):
    """The tiny base with a deterministic, unit-scale VAE and noise levels kept in [0.41, 0.5] of signal."""
    shutil.copytree(src, dst)
    weights_file = dst / "vae" / "diffusion_pytorch_model.safetensors"
    f = SafetensorsFile(weights_file)
    w = {k: np.array(f[k]) for k in f}
    c = w["quant_conv.weight"].shape[0] // 2
    w["quant_conv.weight"][c:] = 0.0
    w["quant_conv.bias"][c:] = -20.0
    save_safetensors(w, weights_file)
    for name, update in (("vae/config.json", {"scaling_factor": 2.5}),
                         ("scheduler/scheduler_config.json", {"trained_betas": [0.5] + [2e-4] * 999})):
        path = dst / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **update}))


@pytest.fixture(scope="module")
def informative(tiny_inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    _informative_base(tiny_inputs["base"], root / "base")
    rng = np.random.default_rng(0)
    entries = []
    for i in range(32):
        Image.new("RGB", (32, 32), tuple(int(x) for x in rng.integers(0, 256, 3))).save(root / f"{i:02d}.png")
        entries.append({"image_file": f"{i:02d}.png", "text": "a colour"})
    (root / "data.json").write_text(json.dumps(entries))
    tfds_builder.prepare_dataset(root / "data.json", root / "tfds", progress=False)
    inputs = {**tiny_inputs, "base": root / "base", "data": root / "tfds"}
    config = make_config(inputs, root / "run", "loss.prediction_type=v_prediction")
    build_encoder_cache(config, root / "cache", batch_size=16, progress=False)
    return config, root / "cache"


def test_adapter_learns_from_the_image_prompt(informative):
    config, cache = informative
    mesh = make_mesh(MeshConfig(data=1, fsdp=1), jax.devices()[:1])
    assembled = build_model(config.model, mesh, (("(.*)", "replicated"),), with_encoders=False, seed=0)
    source = CacheSource(cache)
    records = [source[i] for i in range(len(source))]
    data = {k: np.stack([r[k] for r in records]).astype(np.float32) for k in ("moments", "text", "image")}
    consts = {"alphas_cumprod": jnp.asarray(assembled.info.alphas_cumprod), "uncond": load_unconditional(cache)}
    settings = step_lib.StepSettings(spec=assembled.spec, cached=True, loss=loss_lib.LossSettings(
        "v_prediction", assembled.info.num_train_timesteps, tuple(assembled.info.vae_scaling.items())))
    tx, schedule = step_lib.make_optimizer(config.optimizer.__class__(lr=LR), STEPS)
    step = jax.jit(step_lib.make_train_step(assembled.merge, tx, schedule, settings))
    order = np.random.default_rng(1).permuted(np.tile(np.arange(len(records)), (STEPS * BATCH // 32 + 1, 1)), axis=1)
    order = order.reshape(-1)[: STEPS * BATCH].reshape(STEPS, BATCH)

    def run(drop_image: bool) -> np.ndarray:
        state = step_lib.init_state(assembled.trainable, tx, 0, None, None)
        losses = []
        for rows in order:
            batch = {k: v[rows] for k, v in data.items()}
            batch.update(record_index=rows.astype(np.int32), drop_text=np.ones(BATCH, bool),
                         drop_image=np.full(BATCH, drop_image))
            state, metrics = step(state, assembled.frozen, consts, batch)
            losses.append(metrics["loss"])
        return np.asarray(jax.device_get(losses))

    with_image, without_image = run(False), run(True)
    adapter, dropped = with_image[-LAST:].mean(), without_image[-LAST:].mean()
    assert adapter < 0.9 * dropped, (adapter, dropped)
    assert adapter < 0.8 * with_image[:LAST].mean()  # and it learned at all

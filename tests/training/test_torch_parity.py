"""One training step against the PyTorch reference: diffusers' UNet with IPAdapterAttnProcessor2_0 and
ImageProjection (the official ImageProjModel), the same weights, latents, noise and timesteps, DDPMScheduler
add_noise, F.mse_loss; then torch.optim.AdamW. Loss, every adapter gradient and the updated weights agree."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipadapter_jax.sharding import MeshConfig, make_mesh
from ipadapter_jax.training import loss as loss_lib
from ipadapter_jax.training import step as step_lib
from ipadapter_jax.training.config import ModelConfig, OptimizerConfig
from ipadapter_jax.training.model import build_model

B, LATENT = 4, 8
TIMESTEPS = np.array([3, 250, 640, 999], np.int32)
MIN_SNR_GAMMA = 5.0


def _ours(assembled, enc, draws, settings):
    """(loss, grads) of the plain objective and of the min-SNR (gamma 5) weighted one."""
    alphas = jnp.asarray(assembled.info.alphas_cumprod)
    variants = {"plain": settings, "min_snr": dataclasses.replace(settings, min_snr_gamma=MIN_SNR_GAMMA)}

    def loss_fn(params, settings):
        model = assembled.merge(params, assembled.frozen)
        return loss_lib.loss_terms(model.unet, model.image_proj, assembled.spec, alphas, settings, enc, None,
                                   draws)[0]

    def every(params):
        return {name: jax.value_and_grad(loss_fn)(params, s) for name, s in variants.items()}

    return jax.jit(every)(assembled.trainable)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_train_step_matches_diffusers(torch, tiny_inputs, prediction_type):
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection
    from diffusers.training_utils import compute_snr

    torch.set_num_threads(1)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1), jax.devices()[:1])
    config = ModelConfig(base=str(tiny_inputs["base"]), image_encoder=str(tiny_inputs["encoder"]))
    assembled = build_model(config, mesh, (("(.*)", "replicated"),), with_encoders=False, seed=3)
    spec, params = assembled.spec, assembled.trainable
    scaling = assembled.info.vae_scaling["scaling_factor"]

    rng = np.random.default_rng(0)
    mean = rng.standard_normal((B, LATENT, LATENT, 4)).astype(np.float32)
    text = rng.standard_normal((B, 77, 32)).astype(np.float32)
    image = rng.standard_normal((B, spec.image_feature_dim)).astype(np.float32)
    noise = rng.standard_normal((B, LATENT, LATENT, 4)).astype(np.float32)
    # logvar -30 and no posterior noise: the latents are exactly the mean, as the reference's are.
    enc = loss_lib.Encoded(moments=jnp.asarray(np.concatenate([mean, np.full_like(mean, -30.0)], -1)),
                           text=jnp.asarray(text), image=jnp.asarray(image))
    draws = loss_lib.Draws(latent_noise=jnp.zeros_like(jnp.asarray(noise)), noise=jnp.asarray(noise),
                           timesteps=jnp.asarray(TIMESTEPS))
    settings = loss_lib.LossSettings(prediction_type, 1000, tuple(assembled.info.vae_scaling.items()))
    ours = _ours(assembled, enc, draws, settings)
    loss, grads = ours["plain"]
    if prediction_type == "epsilon":  # every UNet block rematerialised: same loss and gradients
        rematted = build_model(dataclasses.replace(config, remat="dots_no_batch"), mesh,
                               (("(.*)", "replicated"),), with_encoders=False, seed=3)
        remat_loss, remat_grads = _ours(rematted, enc, draws, settings)["plain"]
        assert abs(float(remat_loss) - float(loss)) <= 1e-6 * abs(float(loss))
        for key in grads:  # recomputation reorders float32 sums: compare as against torch, per tensor
            assert _rel(remat_grads[key], grads[key]) < 1e-5, key

    # --- the PyTorch reference with the same weights
    unet = UNet2DConditionModel.from_pretrained(tiny_inputs["base"] / "unet", low_cpu_mem_usage=False).eval()
    unet.requires_grad_(False)
    processors = {}
    for name in unet.attn_processors:
        module = unet.get_submodule(name.removesuffix(".processor"))
        if name.endswith("attn2.processor"):
            processors[name] = IPAdapterAttnProcessor2_0(module.to_q.out_features, 32, num_tokens=(4,), scale=1.0)
        else:
            processors[name] = AttnProcessor2_0()
    unet.set_attn_processor(processors)
    t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731
    trainable = {}  # our key -> torch parameter
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            prefix = "unet/" + name.removesuffix(".processor").replace(".", "/")
            for kv, layer in (("k", proc.to_k_ip[0]), ("v", proc.to_v_ip[0])):
                key = f"{prefix}/to_{kv}_ip/0/kernel"
                layer.weight.data = t(params[key]).T.contiguous()
                layer.weight.requires_grad_(True)
                trainable[key] = layer.weight
    proj = ImageProjection(image_embed_dim=spec.image_feature_dim, cross_attention_dim=32, num_image_text_embeds=4)
    proj.image_embeds.weight.data = t(params["image_proj/proj/kernel"]).T.contiguous()
    proj.image_embeds.bias.data = t(params["image_proj/proj/bias"])
    proj.norm.weight.data = t(params["image_proj/norm/scale"])
    proj.norm.bias.data = t(params["image_proj/norm/bias"])
    trainable.update({"image_proj/proj/kernel": proj.image_embeds.weight,
                      "image_proj/proj/bias": proj.image_embeds.bias,
                      "image_proj/norm/scale": proj.norm.weight, "image_proj/norm/bias": proj.norm.bias})
    assert trainable.keys() == params.keys()

    scheduler = DDPMScheduler.from_pretrained(tiny_inputs["base"] / "scheduler", prediction_type=prediction_type)
    latents = t(mean).permute(0, 3, 1, 2) * scaling
    noise_t = t(noise).permute(0, 3, 1, 2)
    timesteps = torch.from_numpy(TIMESTEPS.astype(np.int64))
    noisy = scheduler.add_noise(latents, noise_t, timesteps)
    target = noise_t if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise_t, timesteps)
    ip_tokens = proj(t(image))
    pred = unet(noisy, timesteps, encoder_hidden_states=(t(text), [ip_tokens[:, None]])).sample
    ref_loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
    # Min-SNR weighting as diffusers' train_text_to_image.py computes it.
    snr = compute_snr(scheduler, timesteps)
    weights = torch.stack([snr, MIN_SNR_GAMMA * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
    ref_min_snr = (per_example * weights).mean()

    for name, ref_value in (("min_snr", ref_min_snr), ("plain", ref_loss)):
        value, our_grads = ours[name]
        for p in trainable.values():
            p.grad = None
        ref_value.backward(retain_graph=True)
        assert abs(float(value) - ref_value.item()) <= 1e-5 * abs(ref_value.item()), name
        for key, p in trainable.items():
            ref = p.grad.numpy()
            g = np.asarray(our_grads[key])
            g = g.T if g.ndim == 2 else g
            assert _rel(g, ref) < 1e-5, (name, key, _rel(g, ref))

    # --- one AdamW step (torch semantics: decoupled weight decay) from those gradients
    cfg = OptimizerConfig(lr=1e-2, weight_decay=1e-2)
    tx, _ = step_lib.make_optimizer(cfg, 10)
    with jax.numpy_dtype_promotion("standard"):
        updates, _ = tx.update(grads, tx.init(params), params)
    ref_opt = torch.optim.AdamW(list(trainable.values()), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                betas=(cfg.b1, cfg.b2), eps=cfg.eps)
    before = {k: p.detach().clone().numpy() for k, p in trainable.items()}
    ref_opt.step()
    for key, p in trainable.items():
        ref_delta = p.detach().numpy() - before[key]
        ours = np.asarray(updates[key])
        ours = ours.T if ours.ndim == 2 else ours
        # Adam's first step is lr * g / (|g| + eps): elements whose gradient is at rounding level may flip.
        err = np.linalg.norm(ours - ref_delta) / np.linalg.norm(ref_delta)
        assert err < 1e-4, (key, err)

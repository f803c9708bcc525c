"""One IP-Adapter training step on the SD1.5-size UNet (frozen, float32, batch 2 at 64x64 latents): this
project's jitted step against the equivalent PyTorch step (diffusers UNet with IPAdapterAttnProcessor2_0,
the official ImageProjModel, adapter weights trainable, AdamW), same weights, inputs, noise and timesteps.

Two modes: with the encoder cache (the step reads VAE moments, text states and CLIP image_embeds, and runs
only the projection and UNet) and without (it also runs the SD1.5 VAE encoder on 512 px images, the CLIP
ViT-L text encoder and the OpenCLIP ViT-H image encoder, as tutorial_train.py does). Each (side, mode) runs
in its own process; peak memory is the process's peak resident set while training (weights + activations),
counted from after set-up (model building, weight conversion and XLA compilation are reported apart).
Random weights: no download.

    python bench/train_step.py [--repeats 3] [--batch 2] [--modes cached,uncached] [--skip-reference]

Last line: RESULT name=train_step ours_s=<median> reference_s=<median> speedup=<reference/ours> (cached mode)
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from pathlib import Path

from _common import configure_xla_for_cpu, emit, host_cpu, run_side

SD15_UNET = {
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 64,
}
SD15_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
            "norm_num_groups": 32, "sample_size": 512, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "scaling_factor": 0.18215}
CLIP_L_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
               "projection_dim": 768, "bos_token_id": 49406, "eos_token_id": 49407}
VIT_H = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
         "patch_size": 14, "image_size": 224, "projection_dim": 1024, "hidden_act": "gelu"}
SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
             "prediction_type": "epsilon"}
SEED, TOKENS, LR = 0, 4, 1e-4


def _peak_rss_gib() -> float:
    """This process's peak resident memory (since the last ``_reset_peak``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _reset_peak() -> None:
    """Start peak-memory accounting afresh (Linux), so set-up and weight conversion do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# ------------------------------------------------------------------------------------------------ ours


def _our_models(cached: bool):
    """The TrainModel (random weights, fixed seeds) and the pieces the library's step needs."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ipadapter_jax.models.adapter_spec import make_spec
    from ipadapter_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
    from ipadapter_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection
    from ipadapter_jax.models.image_proj import build_image_proj
    from ipadapter_jax.models.layers import IPAdapterParam
    from ipadapter_jax.models.target import platform_of, set_target
    from ipadapter_jax.models.unet import UNet2DConditionModel, init_ip_from_text
    from ipadapter_jax.models.unet_config import UNetConfig
    from ipadapter_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
    from ipadapter_jax.training.model import TrainModel, flat_paths, flatten, unflatten

    unet_config = UNetConfig.from_dict(SD15_UNET)
    spec = make_spec("base", unet_config, image_feature_dim=VIT_H["projection_dim"], num_tokens=TOKENS)
    unet = UNet2DConditionModel(unet_config, num_ip_adapters=1, rngs=nnx.Rngs(SEED))
    init_ip_from_text(unet)
    kwargs = {}
    if not cached:
        kwargs = dict(vae=AutoencoderKL(AutoencoderKLConfig.from_dict(SD15_VAE), rngs=nnx.Rngs(SEED + 1)),
                      text_encoders=(CLIPTextModel(CLIPTextConfig.from_dict(CLIP_L_TEXT), rngs=nnx.Rngs(SEED + 2)),),
                      image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(VIT_H),
                                                                  rngs=nnx.Rngs(SEED + 3)))
    model = TrainModel(unet, build_image_proj(spec, dtype=jnp.float32, rngs=nnx.Rngs(SEED + 4)), **kwargs)
    set_target(model, platform_of(jax.devices()))  # the devices' kernels and layouts, as `train` sets them
    graphdef, trainable, frozen = nnx.split(model, IPAdapterParam, ...)
    tp, fp = flat_paths(trainable), flat_paths(frozen)

    def merge(params, frozen_flat):
        return nnx.merge(graphdef, unflatten(params, tp), unflatten(frozen_flat, fp))

    return model, spec, flatten(trainable), flatten(frozen), merge


def _inputs(batch: int, latent: int, cached: bool):
    import numpy as np

    rng = np.random.default_rng(SEED)
    out = {"record_index": np.arange(batch, dtype=np.int32), "drop_image": np.zeros(batch, bool),
           "drop_text": np.zeros(batch, bool)}
    if cached:
        mean = rng.standard_normal((batch, latent, latent, 4)).astype(np.float32)
        out.update(moments=np.concatenate([mean, np.full_like(mean, -4.0)], -1),
                   text=rng.standard_normal((batch, 77, 768)).astype(np.float32),
                   image=rng.standard_normal((batch, VIT_H["projection_dim"])).astype(np.float32))
    else:
        out.update(pixel_values=rng.uniform(-1, 1, (batch, 8 * latent, 8 * latent, 3)).astype(np.float32),
                   clip_pixel_values=rng.standard_normal((batch, 3, 224, 224)).astype(np.float32),
                   input_ids=rng.integers(0, 49406, (batch, 77)).astype(np.int32))
    return out


def _draws(batch: int, latent: int):
    """The noise and timesteps our step draws at step 0 (so the reference can use the same)."""
    import jax
    import numpy as np

    from ipadapter_jax.schedulers import alphas_cumprod_for_config
    from ipadapter_jax.training import loss as loss_lib

    settings = loss_lib.LossSettings("epsilon", 1000, (("scaling_factor", SD15_VAE["scaling_factor"]),))
    key = jax.random.fold_in(jax.random.key(SEED), 0)
    d = loss_lib.draws(key, jax.numpy.arange(batch, dtype=jax.numpy.int32), (latent, latent, 4), settings)
    return settings, alphas_cumprod_for_config(SCHEDULER), {k: np.asarray(v) for k, v in d._asdict().items()}


def run_ours(args, cached: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from ipadapter_jax.training import loss as loss_lib
    from ipadapter_jax.training import step as step_lib
    from ipadapter_jax.training.config import OptimizerConfig

    model, spec, params, frozen, merge = _our_models(cached)
    params = {k: jnp.copy(v) for k, v in params.items()}  # to_k_ip shares to_k's buffer; the step donates params
    settings, alphas, _ = _draws(args.batch, args.latent)
    uncond = loss_lib.Unconditional(text=jnp.zeros((77, 768)), image=jnp.zeros((spec.image_feature_dim,)))
    consts = {"alphas_cumprod": jnp.asarray(alphas), "uncond": uncond}
    tx, schedule = step_lib.make_optimizer(OptimizerConfig(lr=LR, weight_decay=1e-2), 1000)
    state = step_lib.init_state(params, tx, SEED, None, None)
    step = step_lib.make_train_step(merge, tx, schedule, step_lib.StepSettings(spec=spec, loss=settings,
                                                                              cached=cached, remat=args.remat))
    batch = {k: jnp.asarray(v) for k, v in _inputs(args.batch, args.latent, cached).items()}
    del model
    gc.collect()
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, frozen, consts, batch).compile()
    compile_s = time.perf_counter() - start
    flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
    mem = compiled.memory_analysis()
    from ipadapter_jax.host_memory import retain_freed_memory

    retained = retain_freed_memory(mem.temp_size_in_bytes)  # as `train` does on CPU
    xla_gib = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2**30
    setup_peak = _peak_rss_gib()
    gc.collect()
    _reset_peak()
    state, metrics = compiled(state, frozen, consts, batch)
    first_loss = float(metrics["loss"])  # step 0: the draws the reference reuses
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        state, metrics = compiled(state, frozen, consts, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "times": times, "compile_s": compile_s, "flops": flops,
            "loss": first_loss, "xla_gib": xla_gib, "peak_rss_gib": _peak_rss_gib(), "setup_peak_gib": setup_peak,
            "retained": retained}


# ------------------------------------------------------------------------------------------------ reference


def _to_torch(module, torch_model, skip=()):
    import numpy as np
    import torch

    from ipadapter_jax.weights.torch_layout import export_state

    wanted = set(torch_model.state_dict())
    state = {}
    for k, v in export_state(module).items():
        if any(s in k for s in skip):
            continue
        if k not in wanted and k.split(".", 1)[-1] in wanted:  # transformers 5 flattens text_model./vision_model.
            k = k.split(".", 1)[-1]
        state[k] = torch.from_numpy(np.array(v, np.float32))
    missing, unexpected = torch_model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected[:5]
    assert all("position_ids" in k or ".to_k_ip." in k or ".to_v_ip." in k for k in missing), missing[:5]
    return missing


def run_reference(args, cached: bool) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from ipadapter_jax.models.unet import cross_attentions

    model, spec, params, _, _ = _our_models(cached)
    settings, _, draws = _draws(args.batch, args.latent)
    unet = UNet2DConditionModel(**SD15_UNET)
    _to_torch(model.unet, unet, skip=(".to_k_ip.", ".to_v_ip."))
    processors = {}
    for name in unet.attn_processors:
        module = unet.get_submodule(name.removesuffix(".processor"))
        processors[name] = (IPAdapterAttnProcessor2_0(module.to_q.out_features, 768, num_tokens=(TOKENS,), scale=1.0)
                            if name.endswith("attn2.processor") else AttnProcessor2_0())
    unet.set_attn_processor(processors)
    unet.requires_grad_(False)
    trainable = []
    ours_by_name = {".".join(map(str, p)): m for p, m in __import__("flax").nnx.iter_modules(model.unet)
                    if m in cross_attentions(model.unet)}
    for name, attn in ours_by_name.items():
        proc = unet.attn_processors[name + ".processor"]
        for layer, ours in ((proc.to_k_ip[0], attn.to_k_ip[0]), (proc.to_v_ip[0], attn.to_v_ip[0])):
            layer.weight.data = torch.from_numpy(np.asarray(ours.kernel[...]).T.copy())
            layer.weight.requires_grad_(True)
            trainable.append(layer.weight)
    proj = ImageProjection(image_embed_dim=spec.image_feature_dim, cross_attention_dim=768,
                           num_image_text_embeds=TOKENS)
    proj.image_embeds.weight.data = torch.from_numpy(np.asarray(params["image_proj/proj/kernel"]).T.copy())
    proj.image_embeds.bias.data = torch.from_numpy(np.array(params["image_proj/proj/bias"]))
    proj.norm.weight.data = torch.from_numpy(np.array(params["image_proj/norm/scale"]))
    proj.norm.bias.data = torch.from_numpy(np.array(params["image_proj/norm/bias"]))
    trainable += list(proj.parameters())
    encoders = None
    if not cached:
        vae = AutoencoderKL(**SD15_VAE)
        _to_torch(model.vae, vae)
        text = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
        _to_torch(model.text_encoders[0], text)
        image = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H))
        _to_torch(model.image_encoder, image)
        encoders = (vae.eval().requires_grad_(False), text.eval().requires_grad_(False),
                    image.eval().requires_grad_(False))
    del model, params
    gc.collect()
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=1e-2)
    scheduler = DDPMScheduler(**SCHEDULER)
    batch = {k: torch.from_numpy(v) for k, v in _inputs(args.batch, args.latent, cached).items()}
    latent_noise = torch.from_numpy(draws["latent_noise"]).permute(0, 3, 1, 2)
    noise = torch.from_numpy(draws["noise"]).permute(0, 3, 1, 2)
    timesteps = torch.from_numpy(draws["timesteps"].astype(np.int64))

    def train_step() -> float:
        with torch.no_grad():  # tutorial_train.py: the frozen encoders run without gradients
            if cached:
                mean, logvar = batch["moments"].permute(0, 3, 1, 2).chunk(2, dim=1)
                text_states, image_embeds = batch["text"], batch["image"]
            else:
                vae, text, image = encoders
                dist = vae.encode(batch["pixel_values"].permute(0, 3, 1, 2)).latent_dist
                mean, logvar = dist.mean, dist.logvar
                text_states = text(batch["input_ids"].long())[0]
                image_embeds = image(batch["clip_pixel_values"]).image_embeds
            latents = (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * latent_noise) * SD15_VAE["scaling_factor"]
            noisy = scheduler.add_noise(latents, noise, timesteps)
        ip_tokens = proj(image_embeds)
        pred = unet(noisy, timesteps, encoder_hidden_states=(text_states, [ip_tokens[:, None]])).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    setup_peak = _peak_rss_gib()
    gc.collect()
    _reset_peak()
    first_loss = train_step()  # warm-up, and step 0 with our draws
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        train_step()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "times": times, "loss": first_loss,
            "peak_rss_gib": _peak_rss_gib(), "setup_peak_gib": setup_peak, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------ driver


def _side(args) -> None:
    if args.side == "ours":  # the reference runs as installed (configure also sets our process's allocator)
        configure_xla_for_cpu()
    cached = args.mode == "cached"
    emit(run_ours(args, cached) if args.side == "ours" else run_reference(args, cached))


def _run(args, side: str, mode: str) -> dict:
    argv = ["--mode", mode, "--repeats", str(args.repeats), "--batch", str(args.batch), "--latent", str(args.latent),
            "--remat", args.remat]
    return run_side(Path(__file__), argv, side)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--modes", default="cached,uncached")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--remat", default="none", help="our step's model.remat policy (none, dots_no_batch, ...)")
    p.add_argument("--side", choices=["ours", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["cached", "uncached"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        _side(args)
        return
    configure_xla_for_cpu()
    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), {host_cpu()}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; SD1.5 UNet float32, batch {args.batch}, "
          f"{args.latent}x{args.latent} latents, {TOKENS} image tokens, AdamW")
    results = {}
    for mode in args.modes.split(","):
        ours = _run(args, "ours", mode)
        print(f"[{mode}] ours: median {ours['median_s']:.2f} s over {args.repeats} "
              f"({', '.join(f'{t:.2f}' for t in ours['times'])}), compile {ours['compile_s']:.0f} s, "
              f"{ours['flops'] / 1e12:.2f} TFLOP/step ({ours['flops'] / ours['median_s'] / 1e9:.0f} GFLOP/s), "
              f"XLA buffers {ours['xla_gib']:.1f} GiB, peak RSS while training {ours['peak_rss_gib']:.1f} GiB "
              f"(set-up and compile {ours['setup_peak_gib']:.1f} GiB; freed memory kept for reuse: "
              f"{'yes' if ours['retained'] else 'no'}), "
              f"step-0 loss {ours['loss']:.6f}", flush=True)
        ref = None
        if not args.skip_reference:
            ref = _run(args, "reference", mode)
            rel = abs(ours["loss"] - ref["loss"]) / abs(ref["loss"])
            print(f"[{mode}] reference (diffusers + torch {ref['threads']} threads): median {ref['median_s']:.2f} s "
                  f"({', '.join(f'{t:.2f}' for t in ref['times'])}), "
                  f"peak RSS while training {ref['peak_rss_gib']:.1f} GiB, "
                  f"step-0 loss {ref['loss']:.6f} (relative difference {rel:.1e}); speedup "
                  f"{ref['median_s'] / ours['median_s']:.2f}x", flush=True)
        results[mode] = (ours, ref)
    mode = "cached" if "cached" in results else next(iter(results))
    ours, ref = results[mode]
    ref_s = ref["median_s"] if ref else float("nan")
    print(f"RESULT name=train_step ours_s={ours['median_s']:.4f} reference_s={ref_s:.4f} "
          f"speedup={ref_s / ours['median_s']:.2f}")


if __name__ == "__main__":
    main()

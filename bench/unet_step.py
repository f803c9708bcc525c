"""One SD1.5-size UNet forward with a 4-token IP-Adapter: this project (JAX) against diffusers (PyTorch), same
weights and inputs, same machine, same run. Random weights: no download.

    python bench/unet_step.py [--repeats 5] [--batch 2] [--latent 64] [--dtype float32]

Last line: RESULT name=unet_step ours_s=<median> reference_s=<median> speedup=<reference/ours>
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from _common import configure_xla_for_cpu

configure_xla_for_cpu()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ipadapter_jax.models.ip_conditioning import IPConditioning  # noqa: E402
from ipadapter_jax.models.unet import UNet2DConditionModel, cross_attentions  # noqa: E402
from ipadapter_jax.models.unet_config import UNetConfig  # noqa: E402
from ipadapter_jax.weights.pretrained import as_dtype  # noqa: E402
from ipadapter_jax.weights.torch_layout import export_state  # noqa: E402

SD15 = {
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 64,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "chunked", "cudnn"])
    p.add_argument("--skip-reference", action="store_true")
    args = p.parse_args()
    dtype = as_dtype(args.dtype)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"{os.cpu_count()} CPUs, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

    config = UNetConfig.from_dict(SD15)
    unet = UNet2DConditionModel(config, num_ip_adapters=1, attention_impl=args.attention, dtype=dtype,
                                rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.latent, args.latent, 4)).astype(np.float32)
    ctx = rng.standard_normal((args.batch, 77, 768)).astype(np.float32)
    ip_tokens = rng.standard_normal((args.batch, 1, 4, 768)).astype(np.float32)
    t = np.full((args.batch,), 500, np.int32)
    graphdef, state = nnx.split(unet)

    def forward(state, x, t, ctx, ip):
        return nnx.merge(graphdef, state)(x, t, ctx, ip=ip)

    ip = IPConditioning(tokens=(jnp.asarray(ip_tokens, dtype),), scales=(jnp.ones(unet.num_ip_layers),),
                        masks=(None,))
    inputs = (state, jnp.asarray(x, dtype), jnp.asarray(t), jnp.asarray(ctx, dtype), ip)
    start = time.perf_counter()
    compiled = jax.jit(forward).lower(*inputs).compile()
    compile_s = time.perf_counter() - start
    flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
    ours_out = np.asarray(compiled(*inputs).block_until_ready()).astype(np.float32)

    def run_ours():
        compiled(*inputs).block_until_ready()

    run_ref = None
    if not args.skip_reference:
        run_ref, ref_out = _reference(unet, args, x, t, ctx, ip_tokens)
    # Alternate the two so that load from elsewhere on the machine affects both alike; report medians.
    ours_times, ref_times = [], []
    for _ in range(args.repeats):
        ours_times.append(_timed(run_ours))
        if run_ref is not None:
            ref_times.append(_timed(run_ref))
    ours_s = statistics.median(ours_times)
    print(f"ours: compile {compile_s:.1f} s, median {ours_s:.3f} s over {args.repeats} "
          f"({', '.join(f'{s:.2f}' for s in ours_times)}), {flops / ours_s / 1e9:.0f} GFLOP/s of "
          f"{flops / 1e12:.3f} TFLOP")
    if run_ref is None:
        print(f"RESULT name=unet_step ours_s={ours_s:.4f} reference_s=nan speedup=nan")
        return
    ref_s = statistics.median(ref_times)
    err = float(np.linalg.norm(ours_out - ref_out) / np.linalg.norm(ref_out))
    print(f"reference (diffusers {args.dtype}, torch threads {_torch_threads()}): median {ref_s:.3f} s "
          f"({', '.join(f'{s:.2f}' for s in ref_times)}), {flops / ref_s / 1e9:.0f} GFLOP/s; relative difference "
          f"of outputs {err:.2e}")
    print(f"RESULT name=unet_step ours_s={ours_s:.4f} reference_s={ref_s:.4f} speedup={ref_s / ours_s:.2f}")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _reference(unet, args, x, t, ctx, ip_tokens):
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    ref = TorchUNet(**SD15)
    layers = {".".join(map(str, p)): m for p, m in nnx.iter_modules(unet) if m in cross_attentions(unet)}
    processors = {}
    for name in ref.attn_processors:
        if name.endswith("attn2.processor"):
            module = ref.get_submodule(name.removesuffix(".processor"))
            processors[name] = IPAdapterAttnProcessor2_0(module.to_q.out_features, 768, num_tokens=(4,), scale=1.0)
        else:
            processors[name] = AttnProcessor2_0()
    ref.set_attn_processor(processors)
    base = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in export_state(unet, dtype=np.float32).items()
            if ".to_k_ip." not in k and ".to_v_ip." not in k}
    ref.load_state_dict(base, strict=False)
    with torch.no_grad():
        for name, attn in layers.items():
            proc = ref.attn_processors[name + ".processor"]
            proc.to_k_ip[0].weight.copy_(torch.from_numpy(np.asarray(attn.to_k_ip[0].kernel[...], np.float32).T))
            proc.to_v_ip[0].weight.copy_(torch.from_numpy(np.asarray(attn.to_v_ip[0].kernel[...], np.float32).T))
    ref = ref.to(device=device, dtype=tdtype).eval()
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device, tdtype)
    ctx_t = torch.from_numpy(ctx).to(device, tdtype)
    ip_t = torch.from_numpy(ip_tokens).to(device, tdtype)
    tt = torch.from_numpy(t).to(device)

    def run():
        with torch.no_grad():
            out = ref(xt, tt, (ctx_t, [ip_t])).sample
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    out = run()  # warm-up
    return run, out.float().cpu().numpy().transpose(0, 2, 3, 1)


if __name__ == "__main__":
    sys.exit(main())

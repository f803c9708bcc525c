"""One SD1.5-size UNet forward with a 4-token IP-Adapter: this project (JAX) against diffusers (PyTorch),
same random weights (written to disk in diffusers' format) and inputs, same machine, same run. Each side runs
in its own process, alternating (see _common.py).

    python bench/unet_step.py [--rounds 2] [--repeats 3] [--batch 2] [--latent 64] [--dtype float32]

Last line: RESULT name=unet_step ours_s=<median> reference_s=<median> speedup=<reference/ours>
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import alternate, configure_xla_for_cpu, emit, host_cpu, median_of, timed

SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 64, "in_channels": 4, "out_channels": 4,
}


def prepare(work: Path, args) -> None:
    """The UNet folder, the IP-Adapter layer weights and the inputs, shared by both sides."""
    from flax import nnx

    from ipadapter_jax.models.unet import UNet2DConditionModel
    from ipadapter_jax.models.unet_config import UNetConfig
    from ipadapter_jax.tiny_models import write_random_model

    config = UNetConfig.from_dict(SD15_UNET)
    if not (work / "unet" / "config.json").exists():
        write_random_model(work / "unet", SD15_UNET, lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0)),
                           "diffusion_pytorch_model", 0)
    rng = np.random.default_rng(0)
    hidden = {layer.path: layer.hidden_size for layer in config.cross_attention_layers()}
    paths = list(hidden)
    ip = {f"{p}.{kv}": (rng.standard_normal((hidden[p], 768)) / np.sqrt(768)).astype(np.float32)
          for p in paths for kv in ("to_k_ip", "to_v_ip")}
    np.savez(work / "ip.npz", **ip)
    np.savez(work / "inputs.npz", x=rng.standard_normal((args.batch, 4, args.latent, args.latent)).astype(np.float32),
             t=np.full((args.batch,), 500, np.int64), ctx=rng.standard_normal((args.batch, 77, 768)).astype(np.float32),
             ip_tokens=rng.standard_normal((args.batch, 1, 4, 768)).astype(np.float32))


def side_ours(work: Path, args) -> None:
    configure_xla_for_cpu()
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ipadapter_jax.models.ip_conditioning import IPConditioning
    from ipadapter_jax.models.target import platform_of
    from ipadapter_jax.models.unet import cross_attentions
    from ipadapter_jax.weights.diffusers_models import load_unet

    # Built for the devices it runs on, as the pipeline builds it (models/target.py): the CPU paths on a CPU.
    unet = load_unet(work / "unet", dtype=args.dtype, num_ip_adapters=1, attention_impl=args.attention,
                     platform=platform_of(jax.devices()))
    ip_weights = np.load(work / "ip.npz")
    paths = [layer.path for layer in unet.config.cross_attention_layers()]
    for path, attn in zip(paths, cross_attentions(unet), strict=True):
        attn.to_k_ip[0].kernel.set_value(jnp.asarray(ip_weights[f"{path}.to_k_ip"].T, attn.to_k.kernel.dtype))
        attn.to_v_ip[0].kernel.set_value(jnp.asarray(ip_weights[f"{path}.to_v_ip"].T, attn.to_k.kernel.dtype))
    data = np.load(work / "inputs.npz")
    dtype = unet.conv_in.kernel.dtype
    graphdef, state = nnx.split(unet)

    def forward(state, x, t, ctx, ip):
        return nnx.merge(graphdef, state)(x, t, ctx, ip=ip)

    ip = IPConditioning(tokens=(jnp.asarray(data["ip_tokens"], dtype),), scales=(jnp.ones(unet.num_ip_layers),),
                        masks=(None,))
    inputs = (state, jnp.asarray(data["x"].transpose(0, 2, 3, 1), dtype), jnp.asarray(data["t"], jnp.int32),
              jnp.asarray(data["ctx"], dtype), ip)
    compiled = None

    def compile_():
        nonlocal compiled
        compiled = jax.jit(forward).lower(*inputs).compile()

    compile_s = timed(compile_)
    flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
    out = np.asarray(compiled(*inputs).block_until_ready()).astype(np.float32).transpose(0, 3, 1, 2)
    np.save(work / "out_ours.npy", out)
    times = [timed(lambda: compiled(*inputs).block_until_ready()) for _ in range(args.repeats)]
    emit({"times": times, "compile_s": compile_s, "flops": flops, "device": jax.devices()[0].device_kind,
          "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")})


def side_reference(work: Path, args) -> None:
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    unet = UNet2DConditionModel.from_pretrained(work / "unet", low_cpu_mem_usage=False)
    ip_weights = np.load(work / "ip.npz")
    processors = {}
    for name in unet.attn_processors:
        if not name.endswith("attn2.processor"):
            processors[name] = AttnProcessor2_0()
            continue
        path = name.removesuffix(".processor")
        proc = IPAdapterAttnProcessor2_0(unet.get_submodule(path).to_q.out_features, 768, num_tokens=(4,), scale=1.0)
        with torch.no_grad():
            proc.to_k_ip[0].weight.copy_(torch.from_numpy(ip_weights[f"{path}.to_k_ip"]))
            proc.to_v_ip[0].weight.copy_(torch.from_numpy(ip_weights[f"{path}.to_v_ip"]))
        processors[name] = proc
    unet.set_attn_processor(processors)
    unet = unet.to(device=device, dtype=tdtype).eval()
    data = np.load(work / "inputs.npz")
    x, t, ctx, ip = (torch.from_numpy(data[k]).to(device) for k in ("x", "t", "ctx", "ip_tokens"))
    x, ctx, ip = x.to(tdtype), ctx.to(tdtype), ip.to(tdtype)

    def run():
        with torch.no_grad():
            out = unet(x, t, (ctx, [ip])).sample
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    np.save(work / "out_reference.npy", run().float().cpu().numpy())
    times = [timed(run) for _ in range(args.repeats)]
    emit({"times": times, "threads": torch.get_num_threads(), "torch": torch.__version__})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="alternations of the two sides")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per side per round")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "chunked", "cudnn"])
    p.add_argument("--work", type=Path, help="folder for the shared weights and inputs (default: a temp folder)")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--side", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="unet-bench-"))
    if args.side == "ours":
        return side_ours(work, args)
    if args.side == "reference":
        return side_reference(work, args)

    prepare(work, args)
    argv = [a for a in sys.argv[1:] if a != "--skip-reference"] + ([] if args.work else ["--work", str(work)])
    sides = ("ours",) if args.skip_reference else ("ours", "reference")
    reports = alternate(Path(__file__), argv, args.rounds, sides)
    first = reports["ours"][0]
    ours_s, ours_t = median_of(reports["ours"])
    flops = first["flops"]
    print(f"jax {first['jax']} on {first['device']}, {host_cpu()}, XLA_FLAGS={first['xla_flags']!r}; "
          f"batch {args.batch}, {args.latent}x{args.latent} latents, {args.dtype}")
    print(f"ours: compile {first['compile_s']:.1f} s, median {ours_s:.3f} s over {len(ours_t)} "
          f"({', '.join(f'{s:.2f}' for s in ours_t)}), {flops / ours_s / 1e9:.0f} GFLOP/s of {flops / 1e12:.3f} TFLOP")
    if args.skip_reference:
        print(f"RESULT name=unet_step ours_s={ours_s:.4f} reference_s=nan speedup=nan")
        return
    ref_s, ref_t = median_of(reports["reference"])
    a, b = np.load(work / "out_ours.npy"), np.load(work / "out_reference.npy")
    err = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    print(f"reference (diffusers, torch {reports['reference'][0]['torch']}, {reports['reference'][0]['threads']} "
          f"threads): median {ref_s:.3f} s ({', '.join(f'{s:.2f}' for s in ref_t)}), {flops / ref_s / 1e9:.0f} "
          f"GFLOP/s; relative difference of the outputs {err:.2e}")
    print(f"RESULT name=unet_step ours_s={ours_s:.4f} reference_s={ref_s:.4f} speedup={ref_s / ours_s:.2f}")


if __name__ == "__main__":
    sys.exit(main())

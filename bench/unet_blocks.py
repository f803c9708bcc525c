"""The SD1.5 UNet's blocks one at a time, forward and forward + input gradient (frozen weights, as adapter
training backpropagates through them): this project against diffusers, same random weights and inputs, each side
in its own process. Finds which block a whole-step difference comes from (bench/train_step.py times the step).

    python bench/unet_blocks.py [--repeats 5] [--batch 2] [--blocks mid.resnet0,up1.resnet0]

Last line: RESULT name=unet_blocks ours_s=<sum of fwd+bwd medians> reference_s=<same> speedup=<reference/ours>
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _common import configure_xla_for_cpu, emit, host_cpu, run_side
from train_step import SD15_UNET, _to_torch

# name, block path in the UNet, input side (pixels), input channels (None: the resnet's own), kind
BLOCKS = [
    ("down0.resnet0", ("down_blocks", 0, "resnets", 0), 64, None, "resnet"),
    ("down0.attn0", ("down_blocks", 0, "attentions", 0), 64, 320, "transformer"),
    ("down1.resnet1", ("down_blocks", 1, "resnets", 1), 32, None, "resnet"),
    ("down1.attn0", ("down_blocks", 1, "attentions", 0), 32, 640, "transformer"),
    ("down2.resnet1", ("down_blocks", 2, "resnets", 1), 16, None, "resnet"),
    ("down2.attn0", ("down_blocks", 2, "attentions", 0), 16, 1280, "transformer"),
    ("mid.resnet0", ("mid_block", "resnets", 0), 8, None, "resnet"),
    ("up1.resnet0", ("up_blocks", 1, "resnets", 0), 16, None, "resnet"),
    ("up1.upsample", ("up_blocks", 1, "upsamplers", 0), 16, 1280, "upsample"),
    ("up2.resnet0", ("up_blocks", 2, "resnets", 0), 32, None, "resnet"),
    ("up2.upsample", ("up_blocks", 2, "upsamplers", 0), 32, 640, "upsample"),
    ("up3.resnet0", ("up_blocks", 3, "resnets", 0), 64, None, "resnet"),
    ("up3.attn0", ("up_blocks", 3, "attentions", 0), 64, 320, "transformer"),
]


def _pick(model, path):
    for p in path:
        model = model[p] if isinstance(p, int) else getattr(model, p)
    return model


def _median(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _shapes(ours, side: int, channels, kind: str, batch: int):
    channels = channels or ours.norm1.scale.shape[0]
    out_side = 2 * side if kind == "upsample" else side
    out_channels = {"upsample": lambda: ours.conv.kernel.shape[-1], "resnet": lambda: ours.conv2.kernel.shape[-1],
                    "transformer": lambda: channels}[kind]()
    return (batch, side, side, channels), (batch, out_side, out_side, out_channels)


def _time_ours(block, kind: str, x, g, extra, repeats: int) -> tuple[float, float]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(block)

    def run(state, x):
        return nnx.merge(graphdef, state)(x, *extra)

    def output_and_gradient(state, x):  # the output too, as in training: XLA would skip what only it needs
        out, pullback = jax.vjp(lambda x: run(state, x), x)
        return out, pullback(jnp.asarray(g))[0]

    forward = jax.jit(run)
    gradient = jax.jit(output_and_gradient)
    x = jnp.asarray(x)
    return (_median(lambda: forward(state, x).block_until_ready(), repeats),
            _median(lambda: jax.block_until_ready(gradient(state, x)), repeats))


def _time_torch(block, kind: str, x, g, extra, repeats: int) -> tuple[float, float]:
    import torch

    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    g = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous()

    def call(x):
        return block(x, encoder_hidden_states=extra[0]).sample if kind == "transformer" else block(x, *extra)

    def forward_only():
        with torch.no_grad():
            call(x)

    def with_gradient():
        call(x.clone().requires_grad_()).backward(g)

    return _median(forward_only, repeats), _median(with_gradient, repeats)


def side(args) -> None:
    if args.side == "ours":
        configure_xla_for_cpu()
    import jax
    import numpy as np
    from flax import nnx

    from ipadapter_jax.models.target import platform_of, set_target
    from ipadapter_jax.models.unet import UNet2DConditionModel
    from ipadapter_jax.models.unet_config import UNetConfig

    unet = UNet2DConditionModel(UNetConfig.from_dict(SD15_UNET), num_ip_adapters=0, rngs=nnx.Rngs(0))
    set_target(unet, platform_of(jax.devices()))
    rng = np.random.default_rng(0)
    inputs = {"transformer": rng.standard_normal((args.batch, 77, 768)).astype(np.float32),
              "resnet": rng.standard_normal((args.batch, 1280)).astype(np.float32)}
    model, time_block, convert = unet, _time_ours, lambda a: a
    if args.side == "reference":
        import torch
        from diffusers import UNet2DConditionModel as TorchUNet

        model = TorchUNet(**SD15_UNET)
        _to_torch(unet, model)
        model.requires_grad_(False)
        time_block, convert = _time_torch, torch.from_numpy
    results = {}
    chosen = args.blocks.split(",") if args.blocks else [b[0] for b in BLOCKS]
    for name, path, size, channels, kind in (b for b in BLOCKS if b[0] in chosen):
        in_shape, out_shape = _shapes(_pick(unet, path), size, channels, kind, args.batch)
        x = rng.standard_normal(in_shape).astype(np.float32)
        g = rng.standard_normal(out_shape).astype(np.float32)
        extra = (convert(inputs[kind]),) if kind in inputs else ()
        fwd, both = time_block(_pick(model, path), kind, x, g, extra, args.repeats)
        results[name] = {"fwd": fwd, "fwd_bwd": both}
    emit({"blocks": results})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--blocks", help="comma-separated block names (default: all), e.g. mid.resnet0")
    p.add_argument("--side", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        side(args)
        return
    argv = ["--repeats", str(args.repeats), "--batch", str(args.batch)]
    if args.blocks:
        names = [b[0] for b in BLOCKS]
        unknown = sorted(set(args.blocks.split(",")) - set(names))
        if unknown:
            raise SystemExit(f"unknown block(s) {', '.join(unknown)}; choose from {', '.join(names)}")
        argv += ["--blocks", args.blocks]
    ours = run_side(Path(__file__), argv, "ours")["blocks"]
    ref = run_side(Path(__file__), argv, "reference")["blocks"]
    print(f"SD1.5 UNet blocks, float32, batch {args.batch}, {host_cpu()}; medians of {args.repeats} (ms)")
    print(f"{'block':15s} {'ours fwd':>9s} {'torch fwd':>9s} {'ours f+b':>9s} {'torch f+b':>9s} {'ratio f+b':>9s}")
    for name in ours:
        o, r = ours[name], ref[name]
        print(f"{name:15s} {o['fwd'] * 1e3:9.1f} {r['fwd'] * 1e3:9.1f} {o['fwd_bwd'] * 1e3:9.1f} "
              f"{r['fwd_bwd'] * 1e3:9.1f} {r['fwd_bwd'] / o['fwd_bwd']:8.2f}x")
    ours_s, ref_s = sum(v["fwd_bwd"] for v in ours.values()), sum(v["fwd_bwd"] for v in ref.values())
    print(f"RESULT name=unet_blocks ours_s={ours_s:.4f} reference_s={ref_s:.4f} speedup={ref_s / ours_s:.2f}")


if __name__ == "__main__":
    main()

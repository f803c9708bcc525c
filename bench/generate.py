"""Full generation with an IP-Adapter (encode prompt and image, N denoising steps with classifier-free
guidance, VAE decode) on an SD1.5-size pipeline with random weights written to disk in the real formats: this
project (JAX) against diffusers (PyTorch) in the same run, same machine, same folder, each side in its own
process (see _common.py). Reports what a user feels, each against diffusers:
- load: from the local folder, converting (this project's converted-weights cache off);
- first call: the first generation in a process (ours compiles, without the compile cache);
- steady: the median of the calls after it;
- process: one whole command in a new process, from process start to the PNG on disk (`ipadapter-jax generate`
  against a script that imports diffusers, loads, generates and saves): ours once with empty caches (cold), then
  ours in rounds (`--processes`) of diffusers, ours with the caches that run left (warm), and ours with an empty
  compile cache but the converted weights kept (cold compile).
On a GPU also images/s and the fraction of peak FLOP/s.

    python bench/generate.py [--steps 30] [--size 512] [--batch 1] [--repeats 2] [--processes 2]
                             [--processes-only] [--dtype float32] [--controlnet]

Last line: RESULT name=generate ours_s=<steady median> reference_s=<median> speedup=<reference/ours>
load_ours_s=.. load_reference_s=.. first_ours_s=.. first_reference_s=.. process_cold_ours_s=..
process_cold_compile_ours_s=<median> process_warm_ours_s=<median> process_reference_s=<median>
process_warm_speedup=<reference/warm> (one line; with --processes-only the process_* keys alone)

With --controlnet an SD1.5-size ControlNet is written too and each side times calls with and without it, in
turn, in the same process; the last line is then the added cost of one ControlNet per denoising step:
RESULT name=controlnet_step ours_s=<added s/step> reference_s=<added s/step> speedup=<reference/ours>
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import configure_xla_for_cpu, emit, host_cpu, run_side

from ipadapter_jax.tiny_models import (
    SCHEDULER,
    write_random_image_encoder,
    write_random_pipeline,
    write_tiny_controlnet,
    write_tiny_ip_adapter,
)

SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 64, "in_channels": 4, "out_channels": 4,
}
SD15_VAE = {
    "_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215,
}
SD15_TEXT = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": 768,
    "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12, "max_position_embeddings": 77,
    "vocab_size": 49408, "hidden_act": "quick_gelu", "bos_token_id": 0, "eos_token_id": 2, "projection_dim": 768,
}
VIT_H = {
    "architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model", "hidden_size": 1280,
    "intermediate_size": 5120, "num_attention_heads": 16, "num_hidden_layers": 32, "patch_size": 14,
    "image_size": 224, "projection_dim": 1024, "hidden_act": "gelu",
}
UNET_TFLOP_PER_IMAGE = 0.789  # SD1.5 UNet forward at 512x512 (XLA cost analysis, jax-stack.md)
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4}


def write_models(root: Path) -> tuple[Path, Path, Path]:
    base = write_random_pipeline(root / "sd15", unet=SD15_UNET, vae=SD15_VAE, text=SD15_TEXT, scheduler=SCHEDULER)
    encoder = write_random_image_encoder(root / "image_encoder", VIT_H)
    adapter = write_tiny_ip_adapter(root / "ip-adapter_sd15.safetensors", base, encoder)
    return base, encoder, adapter


def write_controlnet(root: Path, base: Path) -> Path:
    """An SD1.5-size ControlNet (lllyasviel/control_v11p_sd15_* layout) with random weights."""
    return write_tiny_controlnet(root / "controlnet", base, conditioning_embedding_out_channels=[16, 32, 96, 256])


def control_image(size: int):
    from PIL import Image

    return Image.fromarray((np.random.default_rng(1).random((size, size, 3)) > 0.9).astype(np.uint8) * 255)


def timed_pairs(run_plain, run_control, repeats: int) -> tuple[list[float], list[float]]:
    """Alternate calls without and with the ControlNet, so that load from elsewhere falls on both alike."""
    plain, control = [], []
    for r in range(repeats):
        for fn, out in ((run_plain, plain), (run_control, control)):
            start = time.perf_counter()
            fn(r + 1)
            out.append(time.perf_counter() - start)
    return plain, control


def reference_image():
    from PIL import Image

    return Image.fromarray((np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8))


def side_ours(base, encoder, adapter, args) -> None:
    configure_xla_for_cpu()
    import jax

    from ipadapter_jax.pipelines.ip_adapter_pipeline import IPAdapterPipeline

    start = time.perf_counter()
    controlnets = [base.parent / "controlnet"] if args.controlnet else []
    pipe = IPAdapterPipeline.from_pretrained(base, image_encoder=encoder, adapters=[adapter], dtype=args.dtype,
                                             controlnets=controlnets)
    load_s = time.perf_counter() - start
    call = dict(images=[reference_image()], num_inference_steps=args.steps, guidance_scale=7.5, height=args.size,
                width=args.size, num_images_per_prompt=args.batch, output_type="np")
    if args.controlnet:
        plain = IPAdapterPipeline(pipe.base, pipe.adapters, image_encoder=pipe.image_encoder,
                                  image_processor=pipe.image_processor, mesh=pipe.mesh)
        hint = control_image(args.size)
        for p, extra in ((plain, {}), (pipe, dict(control_image=hint))):  # compile both first
            p("a photo", seed=0, **call, **extra)
        times, cn_times = timed_pairs(lambda s: plain("a photo", seed=s, **call),
                                      lambda s: pipe("a photo", seed=s, control_image=hint, **call), args.repeats)
        return emit({"load_s": load_s, "times": times, "cn_times": cn_times, "backend": jax.default_backend(),
                     "device": jax.devices()[0].device_kind, "jax": jax.__version__})
    start = time.perf_counter()
    pipe("a photo", seed=0, **call)
    first_s = time.perf_counter() - start
    times = []
    for r in range(args.repeats):
        start = time.perf_counter()
        pipe("a photo", seed=r + 1, **call)
        times.append(time.perf_counter() - start)
    emit({"load_s": load_s, "first_s": first_s, "times": times, "backend": jax.default_backend(),
          "device": jax.devices()[0].device_kind, "jax": jax.__version__})


def side_reference(base, encoder, adapter, args) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name,
                         image_encoder_folder=encoder.name, torch_dtype=dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start
    call = dict(ip_adapter_image=reference_image(), num_inference_steps=args.steps, guidance_scale=7.5,
                height=args.size, width=args.size, num_images_per_prompt=args.batch, output_type="np")
    if args.controlnet:
        from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

        controlnet = ControlNetModel.from_pretrained(base.parent / "controlnet", torch_dtype=dtype).to(device)
        with_cn = StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)
        with_cn.set_progress_bar_config(disable=True)
        hint = control_image(args.size)

        def run_with(p, seed, **extra):
            with torch.no_grad():
                p("a photo", generator=torch.Generator(device).manual_seed(seed), **call, **extra)
            if device == "cuda":
                torch.cuda.synchronize()

        run_with(pipe, 0)
        run_with(with_cn, 0, image=hint)
        times, cn_times = timed_pairs(lambda s: run_with(pipe, s), lambda s: run_with(with_cn, s, image=hint),
                                      args.repeats)
        return emit({"load_s": load_s, "times": times, "cn_times": cn_times, "torch": torch.__version__,
                     "threads": torch.get_num_threads()})

    def run(seed):
        with torch.no_grad():
            pipe("a photo", generator=torch.Generator(device).manual_seed(seed), **call)
        if device == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    run(0)
    first_s = time.perf_counter() - start
    times = []
    for r in range(args.repeats):
        start = time.perf_counter()
        run(r + 1)
        times.append(time.perf_counter() - start)
    emit({"load_s": load_s, "first_s": first_s, "times": times, "torch": torch.__version__,
          "threads": torch.get_num_threads()})


def side_reference_process(base, encoder, adapter, args, out: Path) -> None:
    """A whole diffusers command: import, load, generate one image, save it (timed from outside)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name,
                         image_encoder_folder=encoder.name, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        image = pipe("a photo", ip_adapter_image=Image.open(out.parent / "ref.png"), generator=torch.manual_seed(0),
                     num_inference_steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size,
                     num_images_per_prompt=args.batch).images[0]
    image.save(out)


def process_times(root: Path, argv: list[str], args) -> dict[str, float | list[float]]:
    """Whole commands in new processes (start to PNG): ours cold once, then diffusers, ours warm and ours with a cold
    compile cache in turn."""
    import subprocess

    reference_image().save(root / "ref.png")
    cache = Path(tempfile.mkdtemp(prefix="ipadapter-bench-cache-"))
    env = {**os.environ, "IPADAPTER_JAX_CACHE": str(cache)}
    for key in ("IPADAPTER_JAX_COMPILE_CACHE", "IPADAPTER_JAX_WEIGHTS_CACHE"):
        env.pop(key, None)
    ours = [sys.executable, "-c", "import sys; from ipadapter_jax.cli import main; sys.exit(main())", "generate",
            "--base", str(root / "sd15"), "--image-encoder", str(root / "image_encoder"), "--adapter",
            str(root / "ip-adapter_sd15.safetensors"), "--image", str(root / "ref.png"), "--prompt", "a photo",
            "--steps", str(args.steps), "--guidance", "7.5", "--height", str(args.size), "--width", str(args.size),
            "--num-images", str(args.batch), "--dtype", args.dtype, "--seed", "0", "--overwrite"]
    reference = [sys.executable, str(Path(__file__)), *argv, "--side", "reference-process"]

    def run(name: str, cmd, out: Path, **kw) -> float:
        out.unlink(missing_ok=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
        seconds = time.perf_counter() - start
        written = out.exists() or any(out.parent.glob(out.stem + "-*" + out.suffix))
        if proc.returncode != 0 or not written:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"{name} process failed ({proc.returncode})")
        return seconds

    try:
        ours_out, ref_out = root / "process-ours.png", root / "process-reference.png"
        cold = run("ours", [*ours, "--out", str(ours_out)], ours_out, env=env)
        print(f"process, ours with empty caches (compiles, converts and writes both caches): {cold:.1f} s")
        warm, ref, cold_compile = [], [], []
        for _ in range(args.processes):
            ref.append(run("reference", [*reference, "--process-out", str(ref_out)], ref_out))
            warm.append(run("ours", [*ours, "--out", str(ours_out)], ours_out, env=env))
            shutil.rmtree(cache / "jax")  # the compiled programs only: the converted weights stay
            cold_compile.append(run("ours", [*ours, "--out", str(ours_out)], ours_out, env=env))
        print(f"process, ours with an empty compile cache and the converted weights kept: "
              f"{', '.join(f'{t:.1f}' for t in cold_compile)} s")
        return {"cold": cold, "cold_compile": cold_compile, "warm": warm, "reference": ref}
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=1, help="images per call")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per side after a first (compiling) one")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--models", type=Path, help="reuse (or create) the random model folder here")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--controlnet", action="store_true", help="the added cost of one ControlNet per step")
    p.add_argument("--processes", type=int, default=2,
                   help="rounds of whole commands in new processes, ours warm against diffusers (0: skip)")
    p.add_argument("--processes-only", action="store_true",
                   help="only the whole-process rounds (no in-process load, first call or steady calls)")
    p.add_argument("--side", choices=["ours", "reference", "reference-process"], help=argparse.SUPPRESS)
    p.add_argument("--process-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.processes_only and args.processes < 1:
        p.error("--processes-only needs --processes 1 or more")
    root = args.models or Path(tempfile.mkdtemp(prefix="ipadapter-bench-"))
    base, encoder, adapter = root / "sd15", root / "image_encoder", root / "ip-adapter_sd15.safetensors"
    if args.side == "ours":
        return side_ours(base, encoder, adapter, args)
    if args.side == "reference":
        return side_reference(base, encoder, adapter, args)
    if args.side == "reference-process":
        return side_reference_process(base, encoder, adapter, args, args.process_out)

    start = time.perf_counter()
    if not (base / "model_index.json").exists():
        write_models(root)
    if args.controlnet and not (root / "controlnet" / "config.json").exists():
        write_controlnet(root, base)
    print(f"models in {root} ({time.perf_counter() - start:.0f} s to write); {args.steps} steps, "
          f"{args.size}x{args.size}, batch {args.batch}, {args.dtype}, {host_cpu()}")
    argv = [a for a in sys.argv[1:] if a != "--skip-reference"] + ([] if args.models else ["--models", str(root)])
    if args.controlnet:
        return controlnet_result(argv, args)
    if args.processes_only:
        return emit_result(process_result(root, argv, args))
    ours = run_side(Path(__file__), argv, "ours")
    median = statistics.median(ours["times"])
    print(f"ours (jax {ours['jax']} on {ours['device']}): load {ours['load_s']:.1f} s, first call (compile + run) "
          f"{ours['first_s']:.1f} s, median {median:.2f} s ({', '.join(f'{t:.2f}' for t in ours['times'])}), "
          f"{args.batch / median:.3f} images/s")
    unet_flop = UNET_TFLOP_PER_IMAGE * (args.size / 512) ** 2 * 2 * (args.steps + 1) * args.batch * 1e12
    if ours["backend"] == "gpu":
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in ours["device"]), None)
        achieved = unet_flop / median / 1e12
        print(f"ours: UNet work {unet_flop / 1e12:.1f} TFLOP per call -> {achieved:.0f} TFLOP/s"
              + (f" = {achieved / peak:.1%} of the {peak} TFLOP/s dense bf16 peak" if peak else ""))
    if args.skip_reference:
        print(f"RESULT name=generate ours_s={median:.4f} reference_s=nan speedup=nan")
        return
    ref = run_side(Path(__file__), argv, "reference")
    ref_median = statistics.median(ref["times"])
    print(f"reference (diffusers, torch {ref['torch']}, {ref['threads']} threads): load {ref['load_s']:.1f} s, "
          f"first call {ref['first_s']:.1f} s, median {ref_median:.2f} s "
          f"({', '.join(f'{t:.2f}' for t in ref['times'])}), {args.batch / ref_median:.3f} images/s")
    result = {"ours_s": median, "reference_s": ref_median, "speedup": ref_median / median,
              "load_ours_s": ours["load_s"], "load_reference_s": ref["load_s"], "first_ours_s": ours["first_s"],
              "first_reference_s": ref["first_s"]}
    if args.processes > 0:
        result |= process_result(root, argv, args)
    emit_result(result)


def process_result(root: Path, argv: list[str], args) -> dict[str, float]:
    """The whole-process rounds, printed, as RESULT keys."""
    proc = process_times(root, argv, args)
    warm, reference = statistics.median(proc["warm"]), statistics.median(proc["reference"])
    cold_compile = statistics.median(proc["cold_compile"])
    print(f"process, ours with warm caches: median {warm:.1f} s ({', '.join(f'{t:.1f}' for t in proc['warm'])}); "
          f"diffusers: median {reference:.1f} s ({', '.join(f'{t:.1f}' for t in proc['reference'])}); "
          f"cold ours / diffusers: {proc['cold'] / reference:.2f}x the time, compile cache cold: "
          f"{cold_compile / reference:.2f}x")
    return {"process_cold_ours_s": proc["cold"], "process_cold_compile_ours_s": cold_compile,
            "process_warm_ours_s": warm, "process_reference_s": reference, "process_warm_speedup": reference / warm}


def emit_result(result: dict[str, float]) -> None:
    print("RESULT name=generate " + " ".join(f"{k}={v:.4f}" if k.endswith("_s") else f"{k}={v:.2f}"
                                             for k, v in result.items()))


def controlnet_result(argv: list[str], args) -> None:
    """Each side's added seconds per step with one ControlNet: (median with - median without) / steps."""
    added = {}
    for side in ("ours", "reference") if not args.skip_reference else ("ours",):
        report = run_side(Path(__file__), argv, side)
        plain, with_cn = statistics.median(report["times"]), statistics.median(report["cn_times"])
        added[side] = (with_cn - plain) / args.steps
        print(f"{side}: without ControlNet {plain:.2f} s ({', '.join(f'{t:.2f}' for t in report['times'])}), with "
              f"{with_cn:.2f} s ({', '.join(f'{t:.2f}' for t in report['cn_times'])}) per call: +{added[side]:.3f} s "
              f"per step ({(with_cn - plain) / plain:+.0%})")
    ref = added.get("reference", float("nan"))
    print(f"RESULT name=controlnet_step ours_s={added['ours']:.4f} reference_s={ref:.4f} "
          f"speedup={ref / added['ours']:.2f}")


if __name__ == "__main__":
    sys.exit(main())

"""The `ipadapter-jax` command: thin argument parsing over the library. User errors print one line, no traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--base", required=True, help="diffusers pipeline folder or hub id (runwayml/stable-diffusion-v1-5)")
    g.add_argument("--image-encoder", help="CLIP image encoder folder or owner/repo/path "
                                           "(h94/IP-Adapter/models/image_encoder)")
    g.add_argument("--adapter", action="append", default=[],
                   help="IP-Adapter file or folder, local or owner/repo/path; repeat for several adapters")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--variant", help="weights variant of the base, e.g. fp16")
    g.add_argument("--scheduler", choices=["ddim", "pndm", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_karras"],
                   help="sampler (default: the base folder's scheduler)")
    g.add_argument("--attention", default="auto", choices=["auto", "xla", "chunked", "cudnn"])
    g.add_argument("--fsdp", type=int, default=1,
                   help="split every weight over groups of this many devices (models too large for one chip)")


def _add_sampling_args(p: argparse.ArgumentParser, *, defaults_only: bool = False) -> None:
    g = p.add_argument_group("sampling" + (" (defaults for items that do not set them)" if defaults_only else ""))
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--guidance-rescale", type=float, default=0.0)
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta")


def _scale(text: str):
    """A float, a JSON list/dict (per layer / diffusers' per-block dict) or a preset name."""
    try:
        return float(text)
    except ValueError:
        pass
    if text.strip().startswith(("{", "[")):
        return json.loads(text)
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ipadapter-jax", description="IP-Adapter for Stable Diffusion in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="offline end-to-end run on tiny random models (load, convert, generate, train)")
    demo.add_argument("--out", required=True, type=Path)
    demo.add_argument("--no-train", action="store_true", help="skip the short training run")

    gen = sub.add_parser("generate", help="generate images with image prompts")
    _add_model_args(gen)
    _add_sampling_args(gen)
    gen.add_argument("--image", action="append", default=[],
                     help="reference image(s): with one adapter every --image is a reference for it; with several, "
                          "give one --image per adapter (comma-separated paths for several references)")
    gen.add_argument("--negative-image", action="append", default=[], help="negative reference per adapter")
    gen.add_argument("--face-embeds", action="append", default=[], help="FaceID: .npy InsightFace embedding(s)")
    gen.add_argument("--mask", action="append", default=[], help="regional mask per reference image (adapter 0)")
    gen.add_argument("--combine", default="concat", choices=["concat", "average", "norm_average", "add", "subtract"])
    gen.add_argument("--scale", action="append", type=_scale, default=[],
                     help="IP scale: a float, a JSON per-block dict, or a preset (style, style_and_layout); "
                          "repeat per adapter")
    gen.add_argument("--ip-start", type=float, default=0.0, help="fraction of the steps where the image prompt starts")
    gen.add_argument("--ip-end", type=float, default=1.0, help="fraction of the steps where it stops")
    gen.add_argument("--prompt", default="")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--init-image", help="image-to-image / inpainting input")
    gen.add_argument("--mask-image", help="inpainting mask (white = repaint)")
    gen.add_argument("--strength", type=float)
    gen.add_argument("--latents", type=Path, help="initial noise .npy in diffusers' NCHW layout")
    gen.add_argument("--embeds", type=Path, help="precomputed image embeddings (.npz from --save-embeds)")
    gen.add_argument("--save-embeds", type=Path, help="write the image embeddings to this .npz and continue")
    gen.add_argument("--output-type", default="png", choices=["png", "latent"])
    gen.add_argument("--out", required=True, type=Path, help="output .png (or .npy for latents); several images "
                                                             "get -0, -1, ... suffixes")

    batch = sub.add_parser("batch", help="generate every item of a JSONL manifest, data-parallel, resumable")
    _add_model_args(batch)
    _add_sampling_args(batch, defaults_only=True)
    batch.add_argument("--manifest", required=True, type=Path)
    batch.add_argument("--out", required=True, type=Path)
    batch.add_argument("--batch-size", type=int, help="items per compiled batch (default: the device count)")
    batch.add_argument("--contact-sheet", action="store_true")
    batch.add_argument("--distributed", action="store_true",
                       help="several hosts: call jax.distributed.initialize() first (auto-detected on TPU pods and "
                            "SLURM; otherwise give --coordinator, --num-processes and --process-id)")
    batch.add_argument("--coordinator", help="host:port of process 0 (with --distributed)")
    batch.add_argument("--num-processes", type=int)
    batch.add_argument("--process-id", type=int)

    conv = sub.add_parser("convert", help="convert IP-Adapter weights between the official PyTorch and Flax layouts")
    csub = conv.add_subparsers(dest="direction", required=True)
    to_flax = csub.add_parser("to-flax", help="official .bin/.safetensors -> Flax folder")
    to_flax.add_argument("adapter", type=str)
    to_flax.add_argument("--out", required=True, type=Path)
    to_flax.add_argument("--base", help="UNet folder (or sd15/sd2/sdxl) the adapter is for; inferred when standard")
    to_flax.add_argument("--overwrite", action="store_true")
    to_torch = csub.add_parser("to-torch", help="Flax folder -> official .safetensors or .bin")
    to_torch.add_argument("folder", type=Path)
    to_torch.add_argument("--out", required=True, type=Path)
    to_torch.add_argument("--overwrite", action="store_true")
    from_ckpt = csub.add_parser("from-checkpoint", help="a training workdir's checkpoint -> official layout")
    from_ckpt.add_argument("workdir", type=Path)
    from_ckpt.add_argument("--out", type=Path, help="default: <workdir>/export/step_<N>/ip_adapter.safetensors")
    from_ckpt.add_argument("--step", type=int, help="default: the latest checkpoint")
    from_ckpt.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    prep = sub.add_parser("prepare-data", help="official JSON list or caption folder -> TFDS array_record dataset")
    prep.add_argument("source", type=Path)
    prep.add_argument("--out", required=True, type=Path)
    prep.add_argument("--image-root", type=Path, help="folder the JSON's image_file paths are relative to")
    prep.add_argument("--name", default="ip_adapter_images")
    prep.add_argument("--overwrite", action="store_true")

    train = sub.add_parser("train", help="train an IP-Adapter: --config train/<recipe>.yaml [key=value ...]")
    train.add_argument("--config", required=True, type=Path)
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. workdir=runs/x optimizer.lr=1e-4")

    cache = sub.add_parser("cache-encoders", help="precompute VAE latents, text and image features for training")
    cache.add_argument("--config", required=True, type=Path)
    cache.add_argument("--storage-dtype", choices=["float32", "float16"], default="float32",
                       help="float16 halves the cache (worth it for Plus features, 257x1280 per image)")
    cache.add_argument("--overwrite", action="store_true", help="replace an existing cache")
    cache.add_argument("overrides", nargs="*")

    from ipadapter_jax.evaluation.command import add_arguments as add_evaluate_arguments

    add_evaluate_arguments(sub.add_parser("evaluate", help="CLIP-I / CLIP-T of generated images; `evaluate coco` "
                                                           "runs the paper's COCO2017 protocol"))
    return parser


def _generate(args) -> None:
    import numpy as np

    from ipadapter_jax.errors import UserError
    from ipadapter_jax.pipelines import images as imaging
    from ipadapter_jax.pipelines.image_prompt import ImagePrompt, load_image_embeds, save_image_embeds
    from ipadapter_jax.pipelines.ip_adapter_pipeline import IPAdapterPipeline

    pipe = IPAdapterPipeline.from_pretrained(args.base, image_encoder=args.image_encoder, adapters=args.adapter,
                                             dtype=args.dtype, scheduler=args.scheduler, variant=args.variant,
                                             attention_impl=args.attention, fsdp=args.fsdp)
    n = len(pipe.adapters)
    if n == 1:
        per_adapter = [[p for spec in args.image for p in spec.split(",")]]
    else:
        if args.image and len(args.image) != n:
            raise UserError(f"{n} adapters are loaded: give one --image per adapter (comma-separated for several).")
        per_adapter = [spec.split(",") for spec in args.image] or [[] for _ in range(n)]
    scales = args.scale or [1.0]
    if len(scales) not in (1, n):
        raise UserError(f"give one --scale, or one per adapter ({n}).")
    scales = scales * n if len(scales) == 1 else scales
    faces = [np.load(f, allow_pickle=False) for f in args.face_embeds]
    prompts = []
    for a in range(n):
        prompts.append(ImagePrompt(
            images=per_adapter[a] or None, negative_images=args.negative_image[a:a + 1] or None,
            face_embeds=faces[a] if a < len(faces) else None, scale=scales[a], combine=args.combine,
            masks=(args.mask or None) if a == 0 else None))
    embeds = load_image_embeds(args.embeds, [a.spec for a in pipe.adapters]) if args.embeds else None
    if args.save_embeds:
        computed = embeds or pipe.image_embeds(prompts)
        save_image_embeds(args.save_embeds, computed, [a.spec for a in pipe.adapters])
        print(f"saved image embeddings to {args.save_embeds}")
        embeds = computed
    latents = np.load(args.latents, allow_pickle=False) if args.latents else None
    out = pipe(args.prompt, images=prompts, negative_prompt=args.negative_prompt,
               num_inference_steps=args.steps, guidance_scale=args.guidance, guidance_rescale=args.guidance_rescale,
               height=args.height, width=args.width, num_images_per_prompt=args.num_images, seed=args.seed,
               latents=latents, init_image=args.init_image, strength=args.strength, mask_image=args.mask_image,
               ip_window=(args.ip_start, args.ip_end), eta=args.eta, embeds=embeds,
               output_type="latent" if args.output_type == "latent" else "pil")
    paths = _numbered(args.out, args.num_images, ".npy" if args.output_type == "latent" else ".png")
    if args.output_type == "latent":
        for path, latent in zip(paths, out.latents, strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, latent[None])
    else:
        for path, image in zip(paths, out.images, strict=True):
            imaging.save_png(image, path)
    timing = ", ".join(f"{k} {v:.2f}s" for k, v in out.timings.items())
    print(f"wrote {', '.join(map(str, paths))} (load {pipe.load_seconds:.1f}s; {timing})")


def _numbered(out: Path, count: int, suffix: str) -> list[Path]:
    out = out if out.suffix else out.with_suffix(suffix)
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def _batch(args) -> None:
    if args.distributed:
        import jax

        # Unset values (None) leave jax to detect the cluster (TPU pods, SLURM, ...).
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    from ipadapter_jax.pipelines.batch import run_batch
    from ipadapter_jax.pipelines.ip_adapter_pipeline import IPAdapterPipeline

    pipe = IPAdapterPipeline.from_pretrained(args.base, image_encoder=args.image_encoder, adapters=args.adapter,
                                             dtype=args.dtype, variant=args.variant, attention_impl=args.attention,
                                             fsdp=args.fsdp)
    defaults = {"steps": args.steps, "guidance": args.guidance, "guidance_rescale": args.guidance_rescale,
                "height": args.height, "width": args.width, "seed": args.seed, "scheduler": args.scheduler,
                "eta": args.eta}
    report = run_batch(pipe, args.manifest, args.out, batch_size=args.batch_size, defaults=defaults,
                       contact_sheet=args.contact_sheet)
    print(f"{len(report.written)} written, {len(report.skipped)} already done, {len(report.failed)} failed "
          f"in {report.seconds:.1f}s on {pipe.mesh.size} device(s)")
    for item, reason in report.failed.items():
        print(f"  failed {item}: {reason}", file=sys.stderr)
    if report.failed:
        raise SystemExit(1)


def _convert(args) -> None:
    from ipadapter_jax.ip_adapter import convert_to_flax, convert_to_torch
    from ipadapter_jax.weights.hub import resolve_path

    if args.direction == "from-checkpoint":
        from ipadapter_jax.training import export_checkpoint

        path = export_checkpoint(args.workdir, args.out, step=args.step, overwrite=args.overwrite)
        print(f"wrote {path} (official IP-Adapter layout)")
    elif args.direction == "to-flax":
        spec = convert_to_flax(resolve_path(args.adapter, what="IP-Adapter"), args.out, unet_config=args.base,
                               overwrite=args.overwrite)
        print(f"wrote {args.out}: {spec.variant} adapter, {spec.num_tokens} tokens, cross-attention "
              f"{spec.cross_attention_dim}, {spec.num_layers} layers")
    else:
        path = convert_to_torch(args.folder, args.out, overwrite=args.overwrite)
        print(f"wrote {path} (official IP-Adapter layout)")


def _prepare(args) -> None:
    from ipadapter_jax.data.tfds_builder import prepare_dataset

    report = prepare_dataset(args.source, args.out, image_root=args.image_root, name=args.name,
                             overwrite=args.overwrite)
    print(report.summary())


def _train(args) -> None:
    from ipadapter_jax.training import load_train_config, train

    result = train(load_train_config(args.config, args.overrides))
    print(result.summary() if hasattr(result, "summary") else result)


def _cache(args) -> None:
    from ipadapter_jax.training import build_encoder_cache, load_train_config

    result = build_encoder_cache(load_train_config(args.config, args.overrides), storage_dtype=args.storage_dtype,
                                 overwrite=args.overwrite)
    print(result.summary() if hasattr(result, "summary") else result)


def _demo(args) -> None:
    from ipadapter_jax.demo import run_demo

    run_demo(args.out, train=not args.no_train)


def _evaluate(args) -> None:
    from ipadapter_jax.evaluation.command import run

    run(args)


COMMANDS = {"demo": _demo, "generate": _generate, "batch": _batch, "convert": _convert, "prepare-data": _prepare,
            "train": _train, "cache-encoders": _cache, "evaluate": _evaluate}


def main(argv: list[str] | None = None) -> int:
    from ipadapter_jax.xla_flags import configure_xla_for_cpu

    configure_xla_for_cpu()
    args = build_parser().parse_args(argv)
    from ipadapter_jax.errors import UserError

    try:
        COMMANDS[args.command](args)
    except UserError as e:
        print(f"ipadapter-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ipadapter-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

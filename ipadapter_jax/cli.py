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
    g.add_argument("--scheduler",
                   choices=["ddim", "pndm", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_karras", "lcm"],
                   help="sampler (default: the base folder's scheduler; lcm for LCM-LoRA, 2-8 steps, --guidance 1)")
    g.add_argument("--attention", default="auto", choices=["auto", "xla", "chunked", "cudnn", "pallas"])
    g.add_argument("--fsdp", type=int, default=1,
                   help="split every weight over groups of this many devices (models too large for one chip)")
    g.add_argument("--controlnet", action="append", default=[],
                   help="diffusers ControlNet folder or hub id (lllyasviel/control_v11p_sd15_canny); repeat for "
                        "several")
    g.add_argument("--lora", action="append", default=[], type=_lora,
                   help="LoRA .safetensors (diffusers/PEFT or kohya, local or owner/repo/file) fused into the base, "
                        "FILE[:WEIGHT] (default weight 1); repeat for several")


def _lora(text: str) -> tuple[str, float]:
    """FILE[:WEIGHT]: the weight is what follows the last colon when it reads as a number."""
    path, colon, weight = text.rpartition(":")
    if colon:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def _add_controlnet_args(p: argparse.ArgumentParser, *, batch: bool = False) -> None:
    g = p.add_argument_group("ControlNet" + (" (defaults for items that do not set them)" if batch else ""))
    if not batch:
        g.add_argument("--control-image", action="append", default=[],
                       help="conditioning image of a ControlNet: one per --controlnet, in the same order")
        g.add_argument("--control-preprocess", metavar="canny[:low,high]",
                       help="turn the control images into canny edge maps first (OpenCV: pip install "
                            "'ipadapter-jax[cv]'; default thresholds 100,200)")
    g.add_argument("--control-scale", action="append", type=float, default=[],
                   help="conditioning scale: once for all ControlNets or once per ControlNet (default 1)")
    g.add_argument("--control-start", type=float, default=0.0, help="fraction of the steps where ControlNets start")
    g.add_argument("--control-end", type=float, default=1.0, help="fraction of the steps where they stop")
    g.add_argument("--guess-mode", action="store_true",
                   help="ControlNets act on the conditional branch only, their residuals ramped (diffusers' guess "
                        "mode)")


def _controlnet_settings(args) -> dict:
    """The ControlNet flags checked before any model loads: per ControlNet scale, window and guess mode."""
    from ipadapter_jax.errors import UserError
    from ipadapter_jax.pipelines.control_inputs import check_control_settings, per_controlnet
    from ipadapter_jax.pipelines.settings import number

    for path, weight in args.lora:
        number(f"the weight of --lora {path}", weight)
    n = len(args.controlnet)
    used = [flag for flag, given in (("--control-image", getattr(args, "control_image", None)),
                                     ("--control-preprocess", getattr(args, "control_preprocess", None)),
                                     ("--control-scale", args.control_scale), ("--guess-mode", args.guess_mode),
                                     ("--control-start", args.control_start != 0.0),
                                     ("--control-end", args.control_end != 1.0)) if given]
    if not n:
        if used:
            raise UserError(f"{used[0]} needs --controlnet (the ControlNet it steers).")
        return {}
    scales = per_controlnet(args.control_scale or [1.0], n, "--control-scale")
    check_control_settings(scales, [args.control_start], [args.control_end])
    return dict(control_scale=scales, control_start=args.control_start, control_end=args.control_end,
                guess_mode=args.guess_mode)


def _add_cache_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("caches (under $IPADAPTER_JAX_CACHE, else ~/.cache/ipadapter-jax)")
    g.add_argument("--no-compile-cache", action="store_true",
                   help="compile every program afresh, keeping nothing (also IPADAPTER_JAX_COMPILE_CACHE=0)")
    g.add_argument("--no-weights-cache", action="store_true",
                   help="convert weights to the Flax layout at every load instead of keeping a converted copy "
                        "(also IPADAPTER_JAX_WEIGHTS_CACHE=0)")


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


def _add_control_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image-prompt controls (each once for every adapter, or repeated per adapter)")
    g.add_argument("--weight-type", action="append", default=[],
                   help="how --scale spreads over the attention blocks: linear (default), 'ease in', 'ease out', "
                        "'ease in-out', 'reverse in-out', 'weak input', 'weak middle', 'weak output', 'strong middle', "
                        "'style transfer', composition, 'strong style transfer', 'style and composition', 'strong "
                        "style and composition', 'style transfer precise', 'composition precise' (or with - or _)")
    g.add_argument("--composition-weight", action="append", type=float, default=[],
                   help="weight of the composition blocks in the style-and-composition types (default: --scale)")
    g.add_argument("--layer-weights", action="append", default=[],
                   help="'t:v,t:v,...': attention block t gets v * scale, the others nothing")
    g.add_argument("--composition-image", action="append", default=[],
                   help="SDXL, 'style and composition' types: a second reference for the composition block "
                        "(one per adapter)")
    g.add_argument("--embeds-scaling", action="append", default=[],
                   choices=["v", "kv", "kv-penalty", "kv-mean-penalty"], help="how the weight scales K' and V'")
    g.add_argument("--negative-noise", action="append", default=[],
                   help="fade|dissolve|gaussian|shuffle[:strength]: the unconditional image made from noise")
    g.add_argument("--tiles", choices=["auto"], help="split a non-square or large reference into 256-px tiles")


def _control_options(args, n: int) -> list[dict]:
    """Per adapter, the ImagePrompt keywords of the image-prompt control flags."""
    from ipadapter_jax.pipelines.image_prompt import per_adapter

    options = [{"tiles": args.tiles, "composition_images": args.composition_image[a:a + 1] or None}
               for a in range(n)]
    for key, given, default in (("weight_type", args.weight_type, "linear"),
                                ("composition_weight", args.composition_weight, None),
                                ("layer_weights", args.layer_weights, None),
                                ("embeds_scaling", args.embeds_scaling, "v"),
                                ("negative_noise", args.negative_noise, None)):
        for option, value in zip(options, per_adapter(given or [default], n, f"--{key.replace('_', '-')}"),
                                 strict=True):
            option[key] = value
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ipadapter-jax", description="IP-Adapter for Stable Diffusion in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="offline end-to-end run on the shapes world (convert, generate, measure, train)")
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
    gen.add_argument("--combine", default="concat",
                     choices=["concat", "average", "norm_average", "add", "subtract", "max", "min"])
    gen.add_argument("--scale", action="append", type=_scale, default=[],
                     help="IP scale: a float, a JSON per-block dict, or a preset (style, style_and_layout); "
                          "repeat per adapter")
    _add_control_args(gen)
    _add_controlnet_args(gen)
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
    gen.add_argument("--out", required=True, type=Path, help="output .png, .jpg or .webp (.npy for latents); several "
                                                             "images get -0, -1, ... suffixes")
    gen.add_argument("--overwrite", action="store_true", help="replace existing output files")

    batch = sub.add_parser("batch", help="generate every item of a JSONL manifest, data-parallel, resumable")
    _add_model_args(batch)
    _add_sampling_args(batch, defaults_only=True)
    _add_controlnet_args(batch, batch=True)
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
    plan = sub.add_parser("plan", help="compile for a TPU slice on this host (libtpu, no TPU, no weights): HBM per "
                                       "chip, FLOPs and the TPU compiler's time and MFU estimates")
    plan.add_argument("--job", choices=["train", "generate"], default="train")
    plan.add_argument("--topology", required=True, help="v5p-128, v5e-256, v6e-8 or the raw form v5p:4x4x4")
    plan.add_argument("--slices", type=int, default=1, help="number of such slices (multislice)")
    plan.add_argument("--config", type=Path, help="train: the recipe, train/<name>.yaml")
    plan.add_argument("overrides", nargs="*", help="train: dotted key=value overrides")
    plan.add_argument("--base", default="sd15", help="generate: sd15, sd21, sdxl, a diffusers folder or hub id")
    plan.add_argument("--adapter", default="plus", help="generate: IP-Adapter variant (base, plus, full, ...) or none")
    plan.add_argument("--num-tokens", type=int, help="generate: image tokens (default: the variant's)")
    plan.add_argument("--image-encoder", help="generate: image encoder folder (default ViT-H/14)")
    plan.add_argument("--height", type=int)
    plan.add_argument("--width", type=int)
    plan.add_argument("--steps", type=int, default=30)
    plan.add_argument("--guidance", type=float, default=7.5)
    plan.add_argument("--batch-per-chip", type=int, default=1)
    plan.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    plan.add_argument("--scheduler", default="ddim")
    plan.add_argument("--attention", default="auto", choices=["auto", "xla", "pallas"])
    plan.add_argument("--fsdp", type=int, default=1)
    plan.add_argument("--json", action="store_true", help="print the estimate as JSON")

    from ipadapter_jax.evaluation.command import add_arguments as add_evaluate_arguments

    add_evaluate_arguments(sub.add_parser("evaluate", help="CLIP-I / CLIP-T of generated images; `evaluate coco` "
                                                           "runs the paper's COCO2017 protocol"))
    for name in ("demo", "generate", "batch", "train", "cache-encoders", "evaluate"):  # what compiles on this host
        _add_cache_args(sub.choices[name])
    return parser


def _plan(args) -> None:
    from ipadapter_jax.planning.plan import plan_from_args

    print(plan_from_args(args))


def _generate(args) -> None:
    from ipadapter_jax import images as imaging
    from ipadapter_jax.errors import UserError
    from ipadapter_jax.outputs import check_outputs, save_npy
    from ipadapter_jax.pipelines.control_inputs import load_control_image, parse_preprocess, require_opencv
    from ipadapter_jax.pipelines.image_prompt import ImagePrompt, load_image_embeds, per_adapter, save_image_embeds
    from ipadapter_jax.pipelines.ip_adapter_pipeline import IPAdapterPipeline
    from ipadapter_jax.pipelines.settings import check_generation, load_array

    # Everything that can be checked without the models is checked before they load.
    check_generation(steps=args.steps, guidance=args.guidance, guidance_rescale=args.guidance_rescale, eta=args.eta,
                     strength=args.strength, ip_window=(args.ip_start, args.ip_end), num_images=args.num_images,
                     seed=args.seed)
    latent = args.output_type == "latent"
    paths = _numbered(args.out, args.num_images, latent)
    references = [p for spec in args.image for p in spec.split(",")]
    control = _controlnet_settings(args)
    if len(args.control_image) != len(args.controlnet):
        raise UserError(f"{len(args.controlnet)} --controlnet but {len(args.control_image)} --control-image were "
                        "given; give one control image per ControlNet, in the same order.")
    preprocess = parse_preprocess(args.control_preprocess)
    if preprocess:
        require_opencv()
    inputs = [*references, *args.negative_image, *args.mask, *args.face_embeds, *args.composition_image,
              args.init_image, args.mask_image, args.latents, args.embeds, *args.control_image,
              *(path for path, _ in args.lora)]
    check_outputs(paths, inputs=inputs, overwrite=args.overwrite)
    if args.save_embeds:
        check_outputs([args.save_embeds], inputs=inputs, overwrite=args.overwrite, flag="--save-embeds")
    faces = [load_array(f, "face embedding") for f in args.face_embeds]
    latents = load_array(args.latents, "--latents") if args.latents else None
    if control:
        control["control_image"] = [load_control_image(p, preprocess) for p in args.control_image]

    pipe = IPAdapterPipeline.from_pretrained(args.base, image_encoder=args.image_encoder, adapters=args.adapter,
                                             dtype=args.dtype, scheduler=args.scheduler, variant=args.variant,
                                             attention_impl=args.attention, fsdp=args.fsdp,
                                             controlnets=args.controlnet, loras=args.lora,
                                             weights_cache=_weights_cache(args))
    _note_cpu_bfloat16(pipe, args.dtype)
    n = len(pipe.adapters)
    if n == 1:
        images = [references]
    else:
        images = per_adapter([spec.split(",") for spec in args.image], n, "--image", once=False) if args.image \
            else [[] for _ in range(n)]
    scales = per_adapter(args.scale or [1.0], n, "--scale")
    prompts = []
    controls = _control_options(args, n)
    for a in range(n):
        prompts.append(ImagePrompt(
            images=images[a] or None, negative_images=args.negative_image[a:a + 1] or None,
            face_embeds=faces[a] if a < len(faces) else None, scale=scales[a], combine=args.combine,
            masks=(args.mask or None) if a == 0 else None, **controls[a]))
    embeds = load_image_embeds(args.embeds, [a.spec for a in pipe.adapters]) if args.embeds else None
    if args.save_embeds:
        computed = embeds or pipe.image_embeds(prompts)
        save_image_embeds(args.save_embeds, computed, [a.spec for a in pipe.adapters])
        print(f"saved image embeddings to {args.save_embeds}")
        embeds = computed
    out = pipe(args.prompt, images=prompts, negative_prompt=args.negative_prompt,
               num_inference_steps=args.steps, guidance_scale=args.guidance, guidance_rescale=args.guidance_rescale,
               height=args.height, width=args.width, num_images_per_prompt=args.num_images, seed=args.seed,
               latents=latents, init_image=args.init_image, strength=args.strength, mask_image=args.mask_image,
               ip_window=(args.ip_start, args.ip_end), eta=args.eta, embeds=embeds,
               output_type="latent" if latent else "pil", **control)
    if latent:
        for path, array in zip(paths, out.latents, strict=True):
            save_npy(path, array[None])
    else:
        for path, image in zip(paths, out.images, strict=True):
            imaging.save_image(image, path)
    timing = ", ".join(f"{k} {v:.2f}s" for k, v in out.timings.items())
    print(f"wrote {', '.join(map(str, paths))} (load {pipe.load_seconds:.1f}s; {timing})")
    pipe.finish_weights_cache()


def _note_cpu_bfloat16(pipe, dtype: str) -> None:
    """bfloat16 on a CPU without bfloat16 instructions halves memory but may not speed anything up: say so once
    per command."""
    from ipadapter_jax.models.target import platform_of
    from ipadapter_jax.xla_flags import cpu_has_bfloat16

    if dtype == "bfloat16" and platform_of(pipe.mesh) == "cpu" and not cpu_has_bfloat16():
        print("ipadapter-jax: note: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX), so bfloat16 halves "
              "memory but may run slower than float32 (with them, an SD1.5 UNet step takes 7.3 s in bfloat16 "
              "against 9.4 s in float32 on a 2-core AMD EPYC); use --dtype float32 for speed when memory allows.",
              file=sys.stderr)


def _weights_cache(args):
    """The converted-weights folder for this command (None: off)."""
    from ipadapter_jax.caches import weights_cache_folder

    return None if getattr(args, "no_weights_cache", True) else weights_cache_folder()


def _numbered(out: Path, count: int, latent: bool) -> list[Path]:
    """--out as written (suffix added when missing), or -0, -1, ... for several images."""
    from ipadapter_jax.errors import UserError
    from ipadapter_jax.images import IMAGE_FORMATS

    allowed = (".npy",) if latent else tuple(IMAGE_FORMATS)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file path such as {out / ('image' + allowed[0])}.")
    out = out if out.suffix else out.with_suffix(allowed[0])
    if out.suffix.lower() not in allowed:
        what = "latents (--output-type latent)" if latent else "images"
        choices = allowed[0] if len(allowed) == 1 else f"{', '.join(allowed[:-1])} or {allowed[-1]}"
        raise UserError(f"--out {out} must end in {choices} for {what}.")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def _batch(args) -> int:
    from ipadapter_jax.errors import UserError
    from ipadapter_jax.pipelines.batch import run_batch
    from ipadapter_jax.pipelines.ip_adapter_pipeline import IPAdapterPipeline
    from ipadapter_jax.pipelines.manifest import check_manifest_path
    from ipadapter_jax.pipelines.settings import check_generation, number

    # The run's defaults and paths are checked before the models load; each item is checked on its own later.
    check_generation(steps=args.steps, guidance=args.guidance, guidance_rescale=args.guidance_rescale, eta=args.eta,
                     seed=args.seed)
    if args.batch_size is not None:
        number("--batch-size", args.batch_size, low=1, integer=True)
    check_manifest_path(args.manifest)
    control = _controlnet_settings(args)
    if args.distributed:
        import jax

        try:  # unset values (None) leave jax to detect the cluster (TPU pods, SLURM, ...)
            jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                       process_id=args.process_id)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"--distributed found no cluster to join ({e}); run it on a TPU pod or under SLURM, or "
                            "give --coordinator, --num-processes and --process-id.") from None

    pipe = IPAdapterPipeline.from_pretrained(args.base, image_encoder=args.image_encoder, adapters=args.adapter,
                                             dtype=args.dtype, variant=args.variant, attention_impl=args.attention,
                                             fsdp=args.fsdp, controlnets=args.controlnet, loras=args.lora,
                                             weights_cache=_weights_cache(args))
    _note_cpu_bfloat16(pipe, args.dtype)
    defaults = {"steps": args.steps, "guidance": args.guidance, "guidance_rescale": args.guidance_rescale,
                "height": args.height, "width": args.width, "seed": args.seed, "scheduler": args.scheduler,
                "eta": args.eta, **control}
    report = run_batch(pipe, args.manifest, args.out, batch_size=args.batch_size, defaults=defaults,
                       contact_sheet=args.contact_sheet)
    pipe.finish_weights_cache()
    redone = f" ({len(report.redone)} regenerated: their settings changed)" if report.redone else ""
    print(f"{len(report.written)} written{redone}, {len(report.skipped)} already done, {len(report.failed)} failed "
          f"in {report.seconds:.1f}s on {pipe.mesh.size} device(s)")
    for item, reason in report.failed.items():
        print(f"  failed {item}: {reason}", file=sys.stderr)
    return 1 if report.failed else 0


def _convert(args) -> None:
    from ipadapter_jax.weights.hub import resolve_path
    from ipadapter_jax.weights.ip_adapter_files import convert_to_flax, convert_to_torch

    if args.direction == "from-checkpoint":
        from ipadapter_jax.training import export_checkpoint

        def damaged(step: int, reason: str) -> None:
            print(f"{reason} Exporting an earlier step.", file=sys.stderr)

        path = export_checkpoint(args.workdir, args.out, step=args.step, overwrite=args.overwrite, on_damaged=damaged)
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
    from ipadapter_jax.planning.search import choose
    from ipadapter_jax.training import load_train_config, train

    result = train(load_train_config(args.config, args.overrides), choose_auto=choose)
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
            "train": _train, "cache-encoders": _cache, "plan": _plan, "evaluate": _evaluate}


def main(argv: list[str] | None = None) -> int:
    from ipadapter_jax.xla_flags import configure_xla_for_cpu

    configure_xla_for_cpu()
    args = build_parser().parse_args(argv)
    from ipadapter_jax.caches import compile_cache, compile_cache_folder
    from ipadapter_jax.errors import UserError

    folder = None if getattr(args, "no_compile_cache", True) else compile_cache_folder()
    try:
        with compile_cache(folder):  # the process owner turns JAX's persistent cache on, never the library
            return COMMANDS[args.command](args) or 0
    except UserError as e:
        print(f"ipadapter-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or read-only disk, a permission: the system's words and the file it hit
        where = f" ({e.filename})" if e.filename else ""
        print(f"ipadapter-jax {args.command}: error: {e.strerror or e}{where}; free space, fix the permissions or "
              "choose another path, then rerun.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ipadapter-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

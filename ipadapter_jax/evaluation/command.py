"""Arguments and handler of `ipadapter-jax evaluate` (kept here so `cli.py` stays one parser block and one
call): `evaluate PATH` scores generated images; `evaluate coco` runs the paper's COCO2017 protocol."""

from __future__ import annotations

import argparse
from pathlib import Path

from ipadapter_jax.errors import UserError
from ipadapter_jax.evaluation import run as lib
from ipadapter_jax.pipelines.ip_adapter_pipeline import IPAdapterPipeline

DEFAULT_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_ENCODER = "h94/IP-Adapter/models/image_encoder"
DEFAULT_ADAPTER = "h94/IP-Adapter/models/ip-adapter_sd15.safetensors"
_COCO_ONLY = ("captions", "images", "tfds_data_dir", "limit")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Score generated images with the paper's CLIP-I / CLIP-T (ViT-L/14), or run its COCO2017 "
                     "protocol with `evaluate coco`.")
    p.add_argument("source", help="a folder of generated images with <id>.json sidecars (`ipadapter-jax batch` "
                                  "output), a JSONL manifest ({image, references, captions} per line), or `coco`")
    p.add_argument("--clip", default="openai/clip-vit-large-patch14", help="transformers CLIPModel folder or hub id")
    p.add_argument("--out", type=Path, help="scores JSONL (default: <folder>/scores.jsonl or <manifest>.scores.jsonl);"
                                            " for coco: the output folder (required)")
    p.add_argument("--clip-batch-size", type=int, default=32)
    g = p.add_argument_group("coco (the paper's protocol: 4 images per prompt, DDIM 50 steps, CFG 7.5, IP scale "
                             "1.0, empty prompt)")
    g.add_argument("--captions", type=Path, help="annotations/captions_val2017.json")
    g.add_argument("--images", type=Path, help="the val2017/ image folder")
    g.add_argument("--tfds-data-dir", type=Path, help="instead of --images: a TFDS data dir with coco/2017 prepared")
    g.add_argument("--limit", type=int, help="only the first N image prompts (by image id)")
    g.add_argument("--base", default=DEFAULT_BASE)
    g.add_argument("--image-encoder", default=DEFAULT_ENCODER)
    g.add_argument("--adapter", default=DEFAULT_ADAPTER)
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--per-prompt", type=int, default=4)
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--scale", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="item k of image id i uses seed + 4 i + k")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--batch-size", type=int, help="generation items per compiled batch (default: device count)")


def run(args: argparse.Namespace) -> None:

    if args.source != "coco":
        given = [f"--{k.replace('_', '-')}" for k in _COCO_ONLY if getattr(args, k) is not None]
        if given:
            raise UserError(f"{', '.join(given)} apply to `evaluate coco` only.")
        scores = lib.evaluate_images(args.source, clip=args.clip, out=args.out, batch_size=args.clip_batch_size)
        print(scores.table(f"{len(scores.rows)} images from {args.source}"))
        print(f"per-image scores: {scores.path}")
        return
    if args.out is None or args.captions is None:
        raise UserError("evaluate coco needs --out (a folder) and --captions (captions_val2017.json).")

    coco_run = lib.CocoRun(captions=args.captions, images=args.images, tfds_data_dir=args.tfds_data_dir,
                           limit=args.limit, per_prompt=args.per_prompt, steps=args.steps, guidance=args.guidance,
                           scale=args.scale, seed=args.seed, height=args.height, width=args.width)
    prompts = lib.read_prompts(coco_run, args.out)
    from ipadapter_jax.caches import weights_cache_folder

    weights_cache = None if getattr(args, "no_weights_cache", True) else weights_cache_folder()
    pipe = IPAdapterPipeline.from_pretrained(args.base, image_encoder=args.image_encoder, adapters=[args.adapter],
                                             dtype=args.dtype, scheduler="ddim", weights_cache=weights_cache)
    summary = lib.evaluate_coco(pipe, coco_run, args.out, clip=args.clip, clip_batch_size=args.clip_batch_size,
                                gen_batch_size=args.batch_size, prompts=prompts)
    pipe.finish_weights_cache()
    print(summary["scores"].table(f"COCO2017 val: {summary['prompts']} prompts x {args.per_prompt} images"))
    print(summary["table"])
    print(f"per-image scores: {Path(args.out) / 'scores.jsonl'}; summary: {Path(args.out) / 'summary.json'}")

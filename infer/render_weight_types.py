"""Render one picture per weight type for infer/README.md: one reference image and one prompt at the same seed,
through a tiny random SDXL-layout pipeline (the real 11 attention blocks at tiny widths; offline, about a minute
on 2 CPU cores). Random tiny models show the mechanism (which blocks see the image prompt changes the picture),
not pretty pictures.

    python infer/render_weight_types.py --out infer/weight_types --markdown
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ipadapter_jax.images import save_png
from ipadapter_jax.models.unet_config import STANDARD_BASES
from ipadapter_jax.pipelines.image_prompt import ImagePrompt
from ipadapter_jax.pipelines.ip_adapter_pipeline import IPAdapterPipeline
from ipadapter_jax.pipelines.weight_types import WEIGHT_TYPES, attention_blocks, block_weights
from ipadapter_jax.tiny_models import write_tiny_image_encoder, write_tiny_ip_adapter, write_tiny_pipeline


def reference_image(size: int = 64) -> Image.Image:
    """A fixed synthetic reference: diagonal colour bands and a bright disc."""
    y, x = np.mgrid[0:size, 0:size] / size
    bands = np.stack([np.sin(8 * (x + y)), np.sin(8 * (x - y) + 2), np.cos(6 * x)], -1) * 0.5 + 0.5
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05)[..., None]
    return Image.fromarray((np.where(disc, 1.0, bands) * 255).astype(np.uint8))


def file_name(weight_type: str) -> str:
    return weight_type.replace(" ", "_").replace("-", "_") + ".png"


def render(out: Path, steps: int = 8, seed: int = 3) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    reference = reference_image()
    save_png(reference, out / "reference.png")
    with tempfile.TemporaryDirectory() as tmp:
        base = write_tiny_pipeline(Path(tmp) / "sdxl", "sdxl", full_layout=True)
        encoder = write_tiny_image_encoder(Path(tmp) / "encoder")
        adapter = write_tiny_ip_adapter(Path(tmp) / "ip.safetensors", base, encoder, seed=5)
        pipe = IPAdapterPipeline.from_pretrained(base, image_encoder=encoder, adapters=[adapter])
        written = []
        for weight_type in WEIGHT_TYPES:
            prompt = ImagePrompt(images=[reference], weight_type=weight_type, scale=1.0)
            image = pipe("a landscape", images=[prompt], num_inference_steps=steps, guidance_scale=5.0, seed=seed,
                         height=64, width=64).images[0]
            save_png(image, out / file_name(weight_type))
            written.append(out / file_name(weight_type))
    return written


def markdown_table(folder: str = "weight_types") -> str:
    """The README table: each type's picture and its SDXL block weights at weight 1 (* = branches swapped)."""
    config = STANDARD_BASES["sdxl"]
    index = attention_blocks(config).index
    rows = ["| weight type | picture | SDXL blocks 0-10 (weight 1; * = precise swap) |", "|---|---|---|"]
    for weight_type in WEIGHT_TYPES:
        weights, swap = block_weights(weight_type, 1.0, config)
        first = [int(np.argmax(index == t)) for t in range(index.max() + 1)]  # one layer of each block
        cells = " ".join(f"{weights[i]:.2g}{'*' if swap[i] else ''}" for i in first)
        rows.append(f"| {weight_type} | <img src=\"{folder}/{file_name(weight_type)}\" width=\"96\"> | {cells} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "weight_types")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--markdown", action="store_true", help="also print the README table")
    args = parser.parse_args()
    if args.markdown:
        print(markdown_table())
    for path in render(args.out, steps=args.steps):
        print(path)


if __name__ == "__main__":
    main()

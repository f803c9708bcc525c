"""The tiny SD1.5 job that the command tests share: a pipeline, an image encoder and an IP-Adapter written in the
real formats (`ipadapter_jax.tiny_models`), and random RGB reference images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ipadapter_jax.tiny_models import write_tiny_image_encoder, write_tiny_ip_adapter, write_tiny_pipeline


def write_tiny_job(root: Path) -> tuple[Path, Path, Path]:
    """(base folder, image encoder folder, adapter file) under `root`."""
    base = write_tiny_pipeline(root / "sd15")
    encoder = write_tiny_image_encoder(root / "encoder")
    return base, encoder, write_tiny_ip_adapter(root / "ip.safetensors", base, encoder)


def write_random_images(root: Path, sizes: dict[str, int], seed: int = 0) -> dict[str, Path]:
    """`root/<name>.png`, square random RGB of the given side, drawn in order from one generator."""
    rng = np.random.default_rng(seed)
    paths = {}
    for name, size in sizes.items():
        paths[name] = root / f"{name}.png"
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(paths[name])
    return paths

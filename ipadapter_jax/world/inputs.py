"""`world` placeholders of a training config (`train/world_adapter.yaml`), written under `<workdir>/world/` on
first use: `model.base: world` (the world's diffusers folder with the shipped trained UNet, or the UNet file
given as `world:<path>`), `model.image_encoder: world`, `data.source: world` (the official JSON list of
`TRAIN_IMAGES` scenes)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ipadapter_jax.world.build import SHIPPED_UNET, write_world_base, write_world_image_encoder
from ipadapter_jax.world.scenes import write_world_dataset

WORLD = "world"
TRAIN_IMAGES, TRAIN_SEED = 1024, 1


def uses_world(config) -> bool:
    m = config.model
    return WORLD in (m.base.split(":")[0], m.image_encoder, config.data.source)


def materialize_world(config, primary: bool = True):
    """`config` with the world placeholders replaced by folders (written by the primary process)."""
    root = Path(config.workdir).absolute() / "world"
    m, d = config.model, config.data
    if m.base.split(":")[0] == WORLD:
        unet = Path(m.base.split(":", 1)[1]) if ":" in m.base else SHIPPED_UNET
        folder = root / "base"
        if primary and not (folder / "model_index.json").is_file():  # written last
            write_world_base(folder, unet)
        m = dataclasses.replace(m, base=str(folder))
    if m.image_encoder == WORLD:
        folder = root / "image_encoder"
        if primary and not (folder / "preprocessor_config.json").is_file():  # written last
            write_world_image_encoder(folder)
        m = dataclasses.replace(m, image_encoder=str(folder))
    if d.source == WORLD:
        folder = root / "data"
        if primary and not (folder / "data.json").is_file():  # written last
            write_world_dataset(folder, TRAIN_IMAGES, seed=TRAIN_SEED)
        d = dataclasses.replace(d, source=str(folder / "data.json"))
    return dataclasses.replace(config, model=m, data=d)

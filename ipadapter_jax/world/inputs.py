"""`world` placeholders of a training config (`train/world_adapter.yaml`), written under `<workdir>/world/` on
first use: `model.base: world` (the world's diffusers folder with the shipped trained UNet, or the UNet file
given as `world:<path>`), `model.image_encoder: world`, `data.source: world` (the official JSON list of
`TRAIN_IMAGES` scenes), `eval.images: [world]` (the first `EVAL_IMAGES` held-out scenes, `world:<n>` the first n,
with their captions)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ipadapter_jax.errors import ConfigError
from ipadapter_jax.world.build import SHIPPED_UNET, write_world_base, write_world_image_encoder
from ipadapter_jax.world.scenes import held_out_scenes, render, write_world_dataset

WORLD = "world"
# With 1024 scenes the adapter learned them rather than the world: toy CLIP-I 0.90 on its training scenes, 0.78 on
# held-out ones; with 8192, 0.93 held out.
TRAIN_IMAGES, TRAIN_SEED = 8192, 1
EVAL_IMAGES = 32


def _eval_world(images: tuple[str, ...]) -> int | None:
    """How many held-out scenes `eval.images` asks for (None: it names files)."""
    if len(images) != 1 or images[0].split(":")[0] != WORLD:
        return None
    count = images[0].split(":", 1)[1] if ":" in images[0] else str(EVAL_IMAGES)
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(f"eval.images {images[0]!r}: write world or world:<number of held-out scenes>.")
    return int(count)


def uses_world(config) -> bool:
    m = config.model
    return (WORLD in (m.base.split(":")[0], m.image_encoder, config.data.source)
            or _eval_world(config.eval.images) is not None)


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
    e = config.eval
    count = _eval_world(e.images)
    if count is not None:
        scenes = held_out_scenes(count)
        folder = root / "eval"
        files = tuple(str(folder / f"{i:03d}.png") for i in range(count))
        if primary:
            folder.mkdir(parents=True, exist_ok=True)
            for scene, file in zip(scenes, files, strict=True):
                render(scene).save(file)
        e = dataclasses.replace(e, images=files, captions=e.captions or tuple(s.caption for s in scenes))
    return dataclasses.replace(config, model=m, data=d, eval=e)

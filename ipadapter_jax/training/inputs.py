"""Resolve a config's inputs to folders before a run, writing what is missing under ``<workdir>/`` once.

- ``model.base: tiny`` (or ``tiny-sdxl``) and ``model.image_encoder: tiny``: the tiny random checkpoints of
  ``ipadapter_jax.tiny_models`` (``train/tiny.yaml``: no download);
- ``model.base``/``model.image_encoder``/``data.source: world``: the shapes world (``ipadapter_jax.world``);
- ``data.source: synthetic``: the learnable synthetic shapes dataset; a sample image ``synthetic:<i>`` is its
  i-th picture;
- ``model.base`` a Hugging Face Hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``), ``model.image_encoder``
  and ``model.init_adapter`` hub paths (``h94/IP-Adapter/models/image_encoder``): downloaded, or found in the
  local Hugging Face cache, by every process;
- ``data.source`` an official JSON/JSONL list (images relative to ``data.image_root``, default its folder)
  or a caption folder: prepared as a TFDS array_record dataset in ``<workdir>/data/`` (as ``prepare-data``
  does), so small runs need no separate step. A prepared dataset or TFDS name is used as it is.

Only process 0 writes; the others wait for it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from ipadapter_jax.training.config import TrainConfig

TINY_BASES = {"tiny": "sd15", "tiny-sdxl": "sdxl"}
SYNTHETIC = "synthetic"
SYNTHETIC_IMAGES = 64


def _is_raw_source(source: str) -> bool:
    path = Path(source)
    if path.is_file():
        return True
    if not path.is_dir():
        return False
    patterns = ("dataset_info.json", "*/*/dataset_info.json", "*/*/*/dataset_info.json")
    return not any(any(path.glob(p)) for p in patterns)


def _resolve_hub(m):
    from ipadapter_jax.weights.hub import resolve, resolve_path

    subfolders = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2")
    if m.base and m.base not in TINY_BASES and not Path(m.base).exists():
        m = dataclasses.replace(m, base=str(resolve(m.base, subfolders=subfolders, variant=m.weights_variant,
                                                    what="base model")))
    if m.image_encoder and m.image_encoder != "tiny" and not Path(m.image_encoder).exists():
        m = dataclasses.replace(m, image_encoder=str(resolve_path(m.image_encoder, what="image encoder")))
    if m.init_adapter and not Path(m.init_adapter).exists():
        m = dataclasses.replace(m, init_adapter=str(resolve_path(m.init_adapter, what="initial adapter")))
    return m


def materialize(config: TrainConfig) -> TrainConfig:
    """``config`` with every placeholder and raw source replaced by a ready folder (module doc)."""
    from ipadapter_jax.world.inputs import materialize_world, uses_world

    if uses_world(config):  # the shapes world (train/world_adapter.yaml)
        config = materialize_world(config, primary=jax.process_index() == 0)
    m, d, mon = config.model, config.data, config.monitor
    m = _resolve_hub(m)
    synthetic_images = d.source == SYNTHETIC or any(p.startswith(SYNTHETIC + ":") for p in mon.sample_images)
    raw = bool(d.source) and d.source != SYNTHETIC and not d.cache and _is_raw_source(d.source)
    if not (m.base in TINY_BASES or m.image_encoder == "tiny" or synthetic_images or raw):
        return dataclasses.replace(config, model=m)
    from ipadapter_jax.data import synthetic, tfds_builder
    from ipadapter_jax.tiny_models import write_tiny_image_encoder, write_tiny_pipeline

    root = Path(config.workdir).absolute()
    primary = jax.process_index() == 0
    if m.base in TINY_BASES:
        kind = TINY_BASES[m.base]
        folder = root / "tiny" / kind
        if primary and not (folder / "model_index.json").is_file():
            write_tiny_pipeline(folder, kind=kind)
        m = dataclasses.replace(m, base=str(folder))
    if m.image_encoder == "tiny":
        folder = root / "tiny" / "image_encoder"
        if primary and not (folder / "preprocessor_config.json").is_file():  # written last
            write_tiny_image_encoder(folder)
        m = dataclasses.replace(m, image_encoder=str(folder))
    images = root / "tiny" / "synthetic_images"
    if synthetic_images and primary and not (images / "data.json").is_file():
        synthetic.write_synthetic_dataset(images, SYNTHETIC_IMAGES, size=64, seed=0)
    if d.source == SYNTHETIC or raw:
        source = images / "data.json" if d.source == SYNTHETIC else Path(d.source)
        prepared = root / "data" / "prepared"
        if primary and not tfds_builder.is_prepared_dataset(prepared):
            report = tfds_builder.prepare_dataset(source, prepared, image_root=d.image_root, progress=False,
                                                  overwrite=True)
            print(report.summary(), flush=True)
        d = dataclasses.replace(d, source=str(prepared), image_root=None)
    sample_images = tuple(str(images / f"{int(p.split(':', 1)[1]):05d}.png") if p.startswith(SYNTHETIC + ":")
                          else p for p in mon.sample_images)
    mon = dataclasses.replace(mon, sample_images=sample_images)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("ipadapter_jax training inputs")
    return dataclasses.replace(config, model=m, data=d, monitor=mon)

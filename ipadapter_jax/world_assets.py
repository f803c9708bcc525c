"""Regenerate the shapes world's shipped checkpoints (`assets/`): the base UNet (diffusers format) and the
IP-Adapter (official layout), both float16, plus `assets/world.json` with the toy metrics they reach.

    python -m ipadapter_jax.world_assets   # in a source checkout: reads train/world/base_unet.yaml, world_adapter.yaml

Trains the base with `train/world/base_unet.yaml` on 2000 random scenes (seed 0; a second stage if
`continue_steps`), then the adapter with `train/world_adapter.yaml` through `ipadapter_jax.training.train`, then
evaluates both on 64 held-out scenes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ipadapter_jax.config import load_config
from ipadapter_jax.evaluation.world import evaluate_world
from ipadapter_jax.pipelines.ip_adapter_pipeline import IPAdapterPipeline
from ipadapter_jax.training import load_train_config, train
from ipadapter_jax.weights.safetensors_io import SafetensorsFile, save_safetensors
from ipadapter_jax.world.base_training import BaseTrainConfig, train_base_unet
from ipadapter_jax.world.build import ASSETS, SHIPPED_ADAPTER, SHIPPED_UNET, write_world_base
from ipadapter_jax.world.scenes import held_out_scenes, random_scene

RECIPES = Path(__file__).resolve().parents[1] / "train"
BASE_SCENES, BASE_SEED = 2000, 0


def to_float16(src: Path, dst: Path) -> Path:

    f = SafetensorsFile(src)
    save_safetensors({k: np.asarray(f[k]).astype(np.float16) for k in f}, dst)
    return dst


def regenerate(work: Path, *, base_overrides=(), adapter_overrides=(), assets: Path = ASSETS,
               base_unet: Path | None = None) -> dict:
    """Train the base (or take `base_unet`, a UNet trained with the same recipe) and the adapter; evaluate."""

    record: dict = {"command": "python -m ipadapter_jax.world_assets"}
    assets.mkdir(parents=True, exist_ok=True)
    unet = assets / SHIPPED_UNET.name
    if base_unet is None:
        base = write_world_base(work / "base", unet_weights=None)
        rng = np.random.default_rng(BASE_SEED)
        config = load_config(BaseTrainConfig, RECIPES / "world/base_unet.yaml", list(base_overrides))
        scenes = [random_scene(rng) for _ in range(BASE_SCENES)]
        record["base"] = {"stage_1": train_base_unet(base, scenes, config)}
        if config.continue_steps:
            record["base"]["stage_2"] = train_base_unet(base, scenes, config.second_stage(), resume=True)
        base_unet = base / "unet" / "diffusion_pytorch_model.safetensors"
    else:
        record["base"] = {"given": str(base_unet)}
    shutil.copyfile(base_unet, unet)
    start = time.perf_counter()
    result = train(load_train_config(RECIPES / "world_adapter.yaml",
                                     [f"workdir={work / 'adapter'}", f"model.base=world:{unet}", *adapter_overrides]))
    record["adapter"] = {"steps": result.step, "final_loss": result.losses[-1] if result.history else None,
                         "seconds": time.perf_counter() - start}
    adapter = to_float16(result.exported, assets / SHIPPED_ADAPTER.name)
    world = work / "adapter" / "world"
    pipe = IPAdapterPipeline.from_pretrained(world / "base", image_encoder=world / "image_encoder",
                                             adapters=[adapter], scheduler="ddim")
    record["toy_metrics"] = {k: v.as_dict() for k, v in evaluate_world(pipe, held_out_scenes()).items()}
    (assets / "world.json").write_text(json.dumps(record, indent=1))
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ipadapter_jax.world_assets", description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--assets", type=Path, default=ASSETS, help="where to write (default: the package's)")
    parser.add_argument("--base-unet", type=Path, help="skip the base training: a UNet file trained with "
                                                       "train/world/base_unet.yaml")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        record = regenerate(args.work or Path(tmp), assets=args.assets, base_unet=args.base_unet)
    print(json.dumps(record["toy_metrics"], indent=1))


if __name__ == "__main__":
    main()

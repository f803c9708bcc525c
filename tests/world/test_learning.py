"""Learning is visible: an adapter trained briefly with the real loop (train/world_adapter.yaml) on the shipped
world base makes generations show the image prompt's colours (toy CLIP-I well above chance), as measured
by the run's own evaluation during training. The same scenes generated from their captions alone (IP scale 0,
which is exactly the frozen base whatever the adapter) stay at chance: checked once, on all 64 held-out scenes,
by test_shipped_adapter_passes_the_image_prompt_on."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from ipadapter_jax.evaluation.world import evaluate_world
from ipadapter_jax.pipelines.ip_adapter_pipeline import IPAdapterPipeline
from ipadapter_jax.training import load_train_config, train
from ipadapter_jax.world.build import SHIPPED_ADAPTER, write_world_base, write_world_image_encoder
from ipadapter_jax.world.scenes import held_out_scenes

RECIPE = Path(__file__).resolve().parents[2] / "train" / "world_adapter.yaml"
STEPS = 400  # of the recipe's 8000 (these 16 scenes: toy CLIP-I 0.15 at step 0, 0.44 at 400)
SCENES = 16  # held-out scenes evaluated at step 0 and STEPS
MIN_CLIP_I = 0.33  # with the image prompt after STEPS; chance level is 0.167
MIN_GAIN = 0.1  # over step 0 (the initial adapter already passes a little of the image on)
# The background and the shape's colour both follow the image prompt (chance 0.125; 0.5 and 0.5 at 400 steps on
# the 8192 training scenes; with 1024 the background alone came first and the shape's colour much later).
MIN_COLOURS = 0.375
MAX_TEXT_ONLY_CLIP_I = 0.25
SHIPPED_MIN_CLIP_I = 0.8  # the target; world.json: 0.927; chance 0.167
SHIPPED_SLACK = 0.05  # about 3 of the 192 attributes read


@pytest.mark.optimized_code  # run time dominates: 400 training steps / 64 generations
def test_adapter_learns_on_the_world(tmp_path):
    devices = jax.devices()[:1]  # the 8 fake test devices would only share the same 2 cores
    workdir = tmp_path / "run"
    evals = {}
    config = load_train_config(RECIPE, [
        f"workdir={workdir}", f"total_steps={STEPS}", "monitor.progress_bar=false", "monitor.tensorboard=false",
        "checkpoint.every_steps=100000", "checkpoint.async_save=false", "mesh.data=1",
        f"eval.every_steps={STEPS}", f"eval.images=[world:{SCENES}]"])
    result = train(config, devices=devices, on_eval=lambda step, metrics, _: evals.update({step: metrics}))
    print(evals)
    assert result.step == STEPS and sorted(evals) == [0, STEPS]
    start, end = evals[0], evals[STEPS]
    assert end["clip_i"] >= MIN_CLIP_I and end["clip_i"] >= start["clip_i"] + MIN_GAIN, evals
    assert end["background"] >= MIN_COLOURS and end["colour"] >= MIN_COLOURS, end
    rows = [json.loads(line) for line in (workdir / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, STEPS] and rows[1]["clip_i"] == end["clip_i"]


@pytest.mark.optimized_code  # run time dominates: 400 training steps / 64 generations
def test_shipped_adapter_passes_the_image_prompt_on(tmp_path):
    """The shipped base and adapter (world/assets, as the demo uses them) on the 64 held-out scenes of
    `world.json`: colours, background and quadrant follow the image prompt, and not the caption alone."""
    record = json.loads((SHIPPED_ADAPTER.parent / "world.json").read_text())["toy_metrics"]
    base = write_world_base(tmp_path / "base")
    encoder = write_world_image_encoder(tmp_path / "image_encoder")
    pipe = IPAdapterPipeline.from_pretrained(base, image_encoder=encoder, adapters=[SHIPPED_ADAPTER],
                                             scheduler="ddim", mesh=Mesh(np.asarray(jax.devices()[:1]), ("data",)))
    scores = {k: v.as_dict() for k, v in evaluate_world(pipe, held_out_scenes()).items()}
    print(scores)
    # Another CPU may round a few of the 64 x 3 attributes differently from the machine that wrote world.json.
    assert abs(scores["image_prompt"]["clip_i"] - record["image_prompt"]["clip_i"]) <= SHIPPED_SLACK, scores
    assert scores["image_prompt"]["clip_i"] >= SHIPPED_MIN_CLIP_I, scores
    assert scores["text_only"]["clip_i"] <= MAX_TEXT_ONLY_CLIP_I, scores

"""Evaluation during training (`eval.*`): a tiny run on 2 devices evaluates at start and every 2 steps, logs CLIP-I
and CLIP-T to TensorBoard (the event files read back), eval.jsonl and the checkpoint record, and a resumed run
drops the rows after its checkpoint and carries on; the config is validated like the other sections."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
from training.helpers import make_config, persistent_cache

from ipadapter_jax.checkpoint import Checkpointer
from ipadapter_jax.errors import ConfigError
from ipadapter_jax.evaluation.clip_scores import CLIPScorer, cosine
from ipadapter_jax.images import load_image
from ipadapter_jax.training.config import load_train_config
from ipadapter_jax.training.loop import train


def read_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from every TensorBoard event file in `folder` (TFRecord framing, Event protos)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + length])
            i += 12 + length + 4  # length, its CRC, the record, its CRC
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def _eval_overrides(inputs, clip: Path) -> list[str]:
    images = [str(inputs["images"] / f"{i:05d}.png") for i in range(3)]
    return ["mesh.data=2", "monitor.tensorboard=true", "eval.every_steps=2", f"eval.images=[{','.join(images)}]",
            "eval.captions=[a red circle, a blue square, a shape]", "eval.num_steps=3", "eval.guidance=3.0",
            f"eval.clip={clip}", "eval.batch_size=2", "data.p_drop_image=0.0"]


def test_eval_logs_metrics_and_survives_resume(tiny_inputs, clip_folder, compilation_cache, tmp_path):
    workdir = tmp_path / "run"
    overrides = _eval_overrides(tiny_inputs, clip_folder[0])
    devices = jax.devices()[:2]
    with persistent_cache(compilation_cache):  # the resumed run compiles nothing again
        first = train(make_config(tiny_inputs, workdir, "total_steps=4", *overrides), devices=devices)
    rows = [json.loads(line) for line in (workdir / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4]
    for row in rows:
        assert -1 <= row["clip_i"] <= 1 and 0 <= row["clip_t"] <= 2.5 and -1 <= row["clip_t_cosine"] <= 1
    assert "loss" not in rows[0] and rows[2]["loss"] == pytest.approx(first.losses[-1])
    # The adapter moved, and so did what it generates.
    assert rows[0]["clip_i"] != rows[2]["clip_i"]
    scalars = read_scalars(workdir / "tensorboard")
    for name in ("clip_i", "clip_t", "clip_t_cosine"):
        assert scalars[f"eval/{name}"] == {r["step"]: pytest.approx(r[name], rel=1e-6) for r in rows}
    checkpoints = Checkpointer(workdir / "checkpoints", every_steps=1, keep=0, read_only=True)
    assert checkpoints.read_record(4)["eval"] == rows[-1] and checkpoints.read_record(2)["eval"] == rows[1]
    checkpoints.close()

    # A killed run may have evaluated past its last checkpoint: that row goes, and resuming evaluates again.
    with (workdir / "eval.jsonl").open("a") as f:
        f.write(json.dumps({"step": 5, "clip_i": 0.5}) + "\n")
    with persistent_cache(compilation_cache):
        second = train(make_config(tiny_inputs, workdir, "total_steps=6", *overrides), devices=devices)
    assert second.resumed_from == 4
    resumed = [json.loads(line) for line in (workdir / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [0, 2, 4, 6] and resumed[:3] == rows
    assert set(read_scalars(workdir / "tensorboard")["eval/clip_i"]) == {0, 2, 4, 6}


def test_eval_scores_are_the_papers_clip_scores_of_the_generations(tiny_inputs, clip_folder, tmp_path):
    """The evaluator's CLIP-I is evaluation.clip_scores' cosine of its own generations and references."""
    from ipadapter_jax import sharding as sharding_lib
    from ipadapter_jax.training import inputs
    from ipadapter_jax.training import model as model_lib
    from ipadapter_jax.training.evaluator import Evaluator

    config = inputs.materialize(make_config(tiny_inputs, tmp_path / "w", *_eval_overrides(tiny_inputs,
                                                                                          clip_folder[0])))
    mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:2])
    assembled = model_lib.build_model(config.model, mesh, config.mesh.rules, with_encoders=True, seed=0)
    evaluator = Evaluator(config, assembled, assembled.merge(assembled.trainable, assembled.frozen), mesh)
    metrics, images = evaluator(assembled.trainable, assembled.frozen)
    again, same = evaluator(assembled.trainable, assembled.frozen)
    assert len(images) == 3 and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, same,
                                                                                                   strict=True))
    scorer = CLIPScorer.from_pretrained(clip_folder[0], mesh=mesh)
    refs = [load_image(p) for p in config.eval.images]
    expected = np.mean(cosine(scorer.image_embeddings(images), scorer.image_embeddings(refs)))
    assert metrics["clip_i"] == pytest.approx(expected, rel=1e-6) and again["clip_i"] == metrics["clip_i"]


@pytest.mark.parametrize("override, message", [
    ("eval.every_steps=-1", "eval.every_steps must be >= 0"),
    ("eval.every_steps=10", "eval.images is empty"),
    ("eval.captions=[a, b]", "eval.captions has 2 entries for 1 eval.images"),
    ("eval.num_steps=0", "eval.num_steps and eval.batch_size must be >= 1"),
    ("eval.colour=1", "Unknown config key 'eval.colour'"),
])
def test_eval_config_is_validated(override, message):
    base = ["eval.images=[a.png]"] if "captions" in override else []
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, [*base, override])

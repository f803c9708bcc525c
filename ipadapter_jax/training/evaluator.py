"""Evaluation during training (``eval.*``): the adapter being trained generates one image per held-out image
prompt (`samples.Sampler`, the function the sample grids use, over the training mesh), scored as the paper does
with `evaluation.clip_scores` (CLIP-I against the image prompt, CLIP-T against its caption) or, with
``eval.clip: world``, by the shapes world's exact reader (toy CLIP-I / CLIP-T and each attribute).

Reference images and captions are embedded (or read) once at start. Results go to TensorBoard (``eval/*``), the
console, ``<workdir>/eval.jsonl`` (one row per evaluation, rewritten atomically) and the checkpoint's record.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ipadapter_jax.errors import ConfigError
from ipadapter_jax.evaluation.clip_scores import CLIPScorer, clipscore, cosine
from ipadapter_jax.evaluation.report import write_jsonl
from ipadapter_jax.images import grid, load_image
from ipadapter_jax.training.config import WORLD_METRICS, TrainConfig
from ipadapter_jax.training.samples import Sampler

EVAL_LOG = "eval.jsonl"


class ClipMetrics:
    """The paper's CLIP-I and CLIP-T (CLIPScore scale, and the raw cosine) of generations."""

    name = "CLIP"

    def __init__(self, clip: str, mesh, references, captions: list[str]):
        self.scorer = CLIPScorer.from_pretrained(clip, mesh=mesh)
        self.references = self.scorer.image_embeddings(references)
        self.texts = self.scorer.text_embeddings(captions) if any(captions) else None

    def __call__(self, images) -> dict[str, float]:
        embeds = self.scorer.image_embeddings(images)
        out = {"clip_i": float(np.mean(cosine(embeds, self.references)))}
        if self.texts is not None:
            cos = cosine(embeds, self.texts)
            out.update(clip_t=float(np.mean(clipscore(cos))), clip_t_cosine=float(np.mean(cos)))
        return out


class WorldMetrics:
    """Toy CLIP-I / CLIP-T of the shapes world, read exactly (`world.reader`)."""

    name = "toy"

    def __init__(self, references, captions: list[str]):
        from ipadapter_jax.world.reader import caption_attributes, read_attributes

        for caption in captions:
            try:
                caption_attributes(caption)
            except ValueError as e:
                raise ConfigError(f"eval.clip is {WORLD_METRICS!r}, which needs shapes-world captions: {e}") from None
        self.references = [read_attributes(im) for im in references]
        self.captions = captions

    def __call__(self, images) -> dict[str, float]:
        from ipadapter_jax.world.reader import read_attributes, toy_metrics

        return toy_metrics([read_attributes(im) for im in images], self.references, self.captions)


class Evaluator:
    """``evaluator(params, frozen) -> (metrics, generated images)`` for the run's ``eval`` section."""

    def __init__(self, config: TrainConfig, assembled, encoders, mesh):
        e = config.eval
        references = [load_image(p, what="eval image") for p in e.images]
        captions = e.caption_list()
        self.metrics = (WorldMetrics(references, captions) if e.clip == WORLD_METRICS
                        else ClipMetrics(e.clip, mesh, references, captions))
        self.sampler = Sampler(config.model, assembled, encoders, mesh, captions, references,
                               num_steps=e.num_steps, guidance=e.guidance, scale=e.scale, seed=e.seed,
                               resolution=e.resolution or config.data.resolution, batch_size=e.batch_size)
        self.references = references

    def __call__(self, params, frozen) -> tuple[dict[str, float], list]:
        start = time.perf_counter()
        images = self.sampler(params, frozen)
        metrics = self.metrics(images)
        metrics["seconds"] = time.perf_counter() - start
        return metrics, images

    def sheet(self, images, columns: int = 8):
        """References above their generations, `columns` pairs a row (for TensorBoard)."""
        n = min(len(images), columns)
        return grid([*self.references[:n], *images[:n]], columns=n)


class EvalLog:
    """``<workdir>/eval.jsonl``: one JSON row per evaluation, the whole file rewritten atomically on each append.
    A resumed run first drops the rows of steps after its checkpoint (they are evaluated again)."""

    def __init__(self, workdir: Path, *, keep_through: int, primary: bool):
        self.path = Path(workdir) / EVAL_LOG
        self.primary = primary
        self.rows = [r for r in self._read() if r.get("step", 0) <= keep_through]
        if primary and self.path.exists():
            write_jsonl(self.path, self.rows)

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # written atomically, so only a hand-edited file has such lines
        return rows

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self.primary:
            write_jsonl(self.path, self.rows)


def summary_line(step: int, metrics: dict[str, float], kind: str, n: int) -> str:
    names = [k for k in metrics if k != "seconds"]
    values = " | ".join(f"{k} {metrics[k]:.3f}" for k in names)
    return f"step {step} | eval ({kind}, {n} images, {metrics.get('seconds', 0.0):.1f}s) | {values}"

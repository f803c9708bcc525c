"""`evaluate_images` (a folder or manifest of generated images) and `evaluate_coco` (the paper's protocol)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ipadapter_jax.errors import UserError
from ipadapter_jax.evaluation import coco
from ipadapter_jax.evaluation.clip_scores import DEFAULT_CLIP, CLIPScorer
from ipadapter_jax.evaluation.items import read_items
from ipadapter_jax.evaluation.scoring import Scores, score_items
from ipadapter_jax.pipelines.batch import run_batch


def default_scores_path(source: str | Path) -> Path:
    source = Path(source)
    return source / "scores.jsonl" if source.is_dir() else source.with_name(f"{source.stem}.scores.jsonl")


def evaluate_images(source: str | Path, *, clip: str | Path = DEFAULT_CLIP, out: str | Path | None = None,
                    batch_size: int = 32, progress: bool = True) -> Scores:
    """Score every item of a folder with sidecars or a JSONL manifest (`items`); rows go to `out`."""
    items = read_items(source)
    scorer = CLIPScorer.from_pretrained(clip, batch_size=batch_size)
    return score_items(scorer, items, out=out or default_scores_path(source), progress=progress)


@dataclasses.dataclass(frozen=True)
class CocoRun:
    """Where the prompts come from and how to generate (defaults: the paper's settings)."""

    captions: str | Path
    images: str | Path | None = None  # the val2017/ folder, or
    tfds_data_dir: str | Path | None = None  # a TFDS data dir with coco/2017 prepared
    limit: int | None = None
    per_prompt: int = coco.PER_PROMPT
    steps: int = 50
    guidance: float = 7.5
    scale: float = 1.0
    seed: int = 0
    height: int | None = None  # None: the base's default size
    width: int | None = None

    def __post_init__(self):
        if (self.images is None) == (self.tfds_data_dir is None):
            raise UserError("give the COCO images as either --images (the val2017 folder) or --tfds-data-dir.")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1, not {self.limit}.")


def read_prompts(run: CocoRun, out: str | Path) -> list[coco.CocoImage]:
    """The image prompts with their captions (checked before any model loads)."""
    if run.images is not None:
        return coco.read_coco_captions(run.captions, run.images, run.limit)
    return coco.read_coco_tfds(run.captions, run.tfds_data_dir, Path(out) / "references", run.limit)


def evaluate_coco(pipe, run: CocoRun, out: str | Path, *, clip: str | Path = DEFAULT_CLIP,
                  clip_batch_size: int = 32, gen_batch_size: int | None = None, progress: bool = True,
                  prompts: list[coco.CocoImage] | None = None) -> dict:
    """Generate (resumably) and score; returns the summary written to `out/summary.json`."""

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = prompts if prompts is not None else read_prompts(run, out)
    manifest = coco.generation_manifest(prompts, out, seed=run.seed, scale=run.scale, steps=run.steps,
                                        guidance=run.guidance, per_prompt=run.per_prompt, height=run.height,
                                        width=run.width)
    report = run_batch(pipe, manifest, out / "images", batch_size=gen_batch_size, progress=progress)
    if report.failed:
        first = next(iter(report.failed.items()))
        raise UserError(f"{len(report.failed)} generations failed (first: {first[0]}: {first[1]}); fix and rerun "
                        "(finished images are kept).")
    scorer = CLIPScorer.from_pretrained(clip, batch_size=clip_batch_size)
    items = read_items(coco.evaluation_manifest(prompts, out, run.per_prompt))
    scores = score_items(scorer, items, out=out / "scores.jsonl", progress=progress)
    summary = {"prompts": len(prompts), "images": len(items), "generated_now": len(report.written),
               "already_done": len(report.skipped), "clip_t": scores.mean("clip_t"),
               "clip_t_cosine": scores.mean("clip_t_cosine"), "clip_i": scores.mean("clip_i"),
               "stats": [s.as_dict() for s in scores.stats], "settings": dataclasses.asdict(run),
               "clip": str(clip), "paper": coco.PAPER_IP_ADAPTER}
    summary["table"] = coco.table_row(summary["clip_t"], summary["clip_i"], len(items))
    coco.write_summary(out, summary)
    return {**summary, "scores": scores}

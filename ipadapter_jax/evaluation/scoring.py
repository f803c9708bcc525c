"""Scoring items: each reference image and caption is embedded once, generated images chunk by chunk.

Per item: ``clip_i`` = mean over its reference images of the CLIP-I cosine; ``clip_t`` = mean over its
captions of CLIPScore (2.5 * max(cos, 0), the paper's scale) and ``clip_t_cosine`` = mean raw cosine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ipadapter_jax.evaluation.clip_scores import CLIPScorer, clipscore, cosine
from ipadapter_jax.evaluation.items import EvalItem, check_images
from ipadapter_jax.evaluation.report import Stat, format_table, summarise, write_jsonl
from ipadapter_jax.images import load_image

METRICS = ("clip_i", "clip_t", "clip_t_cosine")


@dataclasses.dataclass
class Scores:
    rows: list[dict]  # one per item, in input order
    stats: list[Stat]
    path: Path | None = None  # where the rows were written

    def table(self, title: str = "") -> str:
        return format_table(self.stats, title)

    def mean(self, name: str) -> float:
        return next(s.mean for s in self.stats if s.name == name)


def _load(path: Path, what: str):

    return load_image(path, what=what)


def _embed_images(scorer: CLIPScorer, paths: Sequence[Path], what: str, bar) -> np.ndarray:
    chunks = []
    for i in range(0, len(paths), scorer.batch_size):
        chunk = paths[i : i + scorer.batch_size]
        chunks.append(scorer.image_embeddings([_load(p, what) for p in chunk]))
        bar.update(len(chunk))
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def score_items(scorer: CLIPScorer, items: Sequence[EvalItem], *, out: str | Path | None = None,
                progress: bool = True) -> Scores:
    """CLIP-I / CLIP-T of every item; the per-item rows go to ``out`` (JSONL, written atomically) if given."""
    check_images(list(items))
    references = sorted({r for item in items for r in item.references})
    captions = sorted({c for item in items for c in item.captions})
    with tqdm(total=len(items) + len(references), desc="CLIP embeddings", unit="img", disable=not progress) as bar:
        ref_embeds = dict(zip(references, _embed_images(scorer, references, "reference image", bar), strict=True))
        generated = _embed_images(scorer, [item.image for item in items], "generated image", bar)
    text_embeds = dict(zip(captions, scorer.text_embeddings(captions), strict=True)) if captions else {}
    rows = []
    for item, embed in zip(items, generated, strict=True):
        row = {"id": item.id, "image": str(item.image), **item.extra}
        if item.references:
            row["clip_i"] = float(np.mean(cosine(embed[None], np.stack([ref_embeds[r] for r in item.references]))))
            row["references"] = [str(r) for r in item.references]
        if item.captions:
            cos = cosine(embed[None], np.stack([text_embeds[c] for c in item.captions]))
            row.update(clip_t=float(np.mean(clipscore(cos))), clip_t_cosine=float(np.mean(cos)),
                       captions=list(item.captions))
        rows.append(row)
    path = write_jsonl(out, rows) if out is not None else None
    return Scores(rows=rows, stats=summarise(rows, METRICS), path=path)

"""Per-image score files and their summary: means with 95% confidence intervals (Student t on the per-image
scores, which treats images as independent; several generations of one prompt are not, so the interval is
a lower bound on the uncertainty about the prompt population)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

# Two-sided 95% Student t quantiles for 1..10 degrees of freedom; beyond, a Cornish-Fisher expansion
# (error below 1e-3 from 11 on).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
_Z975 = 1.959964


def t_quantile_975(dof: int) -> float:
    if dof < 1:
        return math.nan
    if dof <= len(_T975):
        return _T975[dof - 1]
    z, v = _Z975, float(dof)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3))


@dataclasses.dataclass(frozen=True)
class Stat:
    name: str
    n: int
    mean: float
    ci95: float  # half-width; nan for fewer than 2 values

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarise(rows: Sequence[dict], names: Iterable[str]) -> list[Stat]:
    """Mean and 95% CI half-width of each named score over the rows that have it."""
    out = []
    for name in names:
        values = np.asarray([r[name] for r in rows if r.get(name) is not None], np.float64)
        if values.size == 0:
            continue
        half = t_quantile_975(values.size - 1) * values.std(ddof=1) / math.sqrt(values.size) \
            if values.size > 1 else math.nan
        out.append(Stat(name, int(values.size), float(values.mean()), float(half)))
    return out


def format_table(stats: Sequence[Stat], title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'metric':<16} {'n':>7} {'mean':>9}   95% CI")
    for s in stats:
        ci = "n/a" if math.isnan(s.ci95) else f"[{s.mean - s.ci95:.4f}, {s.mean + s.ci95:.4f}]"
        lines.append(f"{s.name:<16} {s.n:>7} {s.mean:>9.4f}   {ci}")
    return "\n".join(lines)


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    return write_atomic(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))

"""`ipadapter-jax evaluate`: a manifest, a batch output folder, and `evaluate coco --limit 8` end to end on tiny
models (a fake COCO captions file and images written here); resuming; bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from tiny_jobs import write_tiny_job

from ipadapter_jax.cli import main
from ipadapter_jax.evaluation.clip_scores import CLIPScorer, clipscore, cosine
from ipadapter_jax.evaluation.report import t_quantile_975


def _write_images(folder, n, seed, size=(40, 48)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_manifest_scores_and_summary(clip_folder, tmp_path, capsys):
    folder, _ = clip_folder
    generated, refs = _write_images(tmp_path / "gen", 5, 0), _write_images(tmp_path / "ref", 5, 1)
    captions = [["a cat", "a small cat"], ["a dog"], [], ["red"], ["blue", "green", "a"]]
    lines = [{"id": f"g{i}", "image": f"gen/{i:03d}.png", "references": [f"ref/{i:03d}.png"], "captions": c}
             for i, c in enumerate(captions)]
    manifest = tmp_path / "items.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines))
    assert main(["evaluate", str(manifest), "--clip", str(folder)]) == 0
    rows = _rows(tmp_path / "items.scores.jsonl")
    assert [r["id"] for r in rows] == [f"g{i}" for i in range(5)] and "clip_t" not in rows[2]
    scorer = CLIPScorer.from_pretrained(folder)
    gen = scorer.image_embeddings([Image.open(p) for p in generated])
    ref = scorer.image_embeddings([Image.open(p) for p in refs])
    np.testing.assert_allclose([r["clip_i"] for r in rows], cosine(gen, ref), rtol=1e-6, atol=1e-7)
    for i, c in enumerate(captions):
        if c:
            cos = cosine(gen[i][None], scorer.text_embeddings(c))
            assert rows[i]["clip_t"] == pytest.approx(float(np.mean(clipscore(cos))), rel=1e-6, abs=1e-7)
            assert rows[i]["clip_t_cosine"] == pytest.approx(float(np.mean(cos)), rel=1e-6, abs=1e-7)
    values = np.array([r["clip_i"] for r in rows])
    half = t_quantile_975(4) * values.std(ddof=1) / np.sqrt(5)
    out = capsys.readouterr().out
    assert f"[{values.mean() - half:.4f}, {values.mean() + half:.4f}]" in out and "clip_t_cosine" in out


def test_t_quantiles():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(10) == 2.228
    assert abs(t_quantile_975(11) - 2.201) < 1e-3 and abs(t_quantile_975(30) - 2.042) < 1e-3
    assert abs(t_quantile_975(10**6) - 1.960) < 1e-3


def test_bad_inputs_are_one_line_errors(clip_folder, tmp_path, capsys):
    folder, _ = clip_folder
    (tmp_path / "broken.png").write_bytes(b"not a png")
    _write_images(tmp_path / "ref", 1, 0)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "broken.png", "references": ["ref/000.png"]}))
    cases = [
        (["evaluate", str(manifest), "--clip", str(folder)], "broken.png (item 000001) is not a readable image"),
        (["evaluate", str(tmp_path / "nothing")], "does not exist"),
        (["evaluate", str(tmp_path / "ref")], "no images with <id>.json sidecars"),
        (["evaluate", str(manifest), "--limit", "3"], "--limit apply to `evaluate coco` only"),
        (["evaluate", "coco", "--out", str(tmp_path / "o"), "--captions", str(tmp_path / "missing.json"),
          "--images", str(tmp_path)], "captions file"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


@pytest.fixture(scope="module")
def fake_coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    paths = _write_images(root / "val2017", 10, 3)
    ids = [139, 285, 632, 724, 776, 785, 802, 872, 885, 1000]  # 1000 has no caption; only 8 are used (limit)
    images = [{"id": i, "file_name": p.name} for i, p in zip(ids, paths, strict=True)]
    annotations = [{"id": 10 * n + k, "image_id": i, "caption": f"caption {k} of image {i}"}
                   for n, i in enumerate(ids[:-1]) for k in range(2)]
    (root / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    base, encoder, adapter = write_tiny_job(root)
    return root, ids, base, encoder, adapter


def test_evaluate_coco_end_to_end_and_resume(fake_coco, clip_folder, tmp_path, capsys):
    root, ids, base, encoder, adapter = fake_coco
    out = tmp_path / "run"
    argv = ["evaluate", "coco", "--captions", str(root / "captions_val2017.json"), "--images", str(root / "val2017"),
            "--limit", "8", "--base", str(base), "--image-encoder", str(encoder), "--adapter", str(adapter),
            "--clip", str(clip_folder[0]), "--out", str(out), "--steps", "10"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| IP-Adapter (paper, Table 1) | 5000 x 4 | 0.588 | 0.828 |" in printed
    rows = _rows(out / "scores.jsonl")
    assert len(rows) == 32 and len(list((out / "images").glob("*.png"))) == 32
    used = sorted(ids[:-1])[:8]
    assert sorted({r["coco_id"] for r in rows}) == used
    for image_id in used:
        for k in range(4):
            sidecar = json.loads((out / "images" / f"{image_id:012d}_{k}.json").read_text())
            assert sidecar["seed"] == 4 * image_id + k and sidecar["steps"] == 10 and sidecar["guidance"] == 7.5
            assert sidecar["scale"] == [1.0] and sidecar["prompt"] == "" and sidecar["scheduler"] == "ddim"
    row = next(r for r in rows if r["id"] == f"{used[0]:012d}_0")
    assert row["captions"] == [f"caption {k} of image {used[0]}" for k in range(2)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 32 and summary["generated_now"] == 32
    assert summary["clip_i"] == pytest.approx(np.mean([r["clip_i"] for r in rows]))
    # Generation is resumable: a second run generates nothing and gives the same scores.
    assert main(argv) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["generated_now"] == 0 and again["already_done"] == 32 and again["clip_i"] == summary["clip_i"]
    # The batch output folder scores on its own: the sidecars name the reference image (the prompt is empty).
    assert main(["evaluate", str(out / "images"), "--clip", str(clip_folder[0])]) == 0
    by_id = {r["id"]: r for r in _rows(out / "images" / "scores.jsonl")}
    assert len(by_id) == 32 and all("clip_t" not in r for r in by_id.values())
    np.testing.assert_allclose([by_id[r["id"]]["clip_i"] for r in rows], [r["clip_i"] for r in rows], rtol=1e-6)

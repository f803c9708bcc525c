"""Reliability: every command, given bad input or hit by a fault, exits non-zero with one line naming the problem and
the fix, prints no traceback, and leaves every input and earlier output byte-identical. Table-driven by class:
bad values, bad files, output paths, resource limits, data loss (training faults: tests/training/test_faults.py)."""

from __future__ import annotations

import errno
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_jobs import write_tiny_job

from ipadapter_jax.cli import main
from ipadapter_jax.pipelines.ip_adapter_pipeline import IPAdapterPipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    return write_tiny_job(root)


@pytest.fixture(scope="module", autouse=True)
def load_once():
    """The CLI loads the tiny models once for this module (the subject here is input handling, not loading)."""
    cache = {}
    original = IPAdapterPipeline.from_pretrained.__func__

    def cached(cls, *args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in cache:
            cache[key] = original(cls, *args, **kwargs)
        return cache[key]

    patch = pytest.MonkeyPatch()
    patch.setattr(IPAdapterPipeline, "from_pretrained", classmethod(cached))
    yield
    patch.undo()


@pytest.fixture
def work(tmp_path):
    """A folder of inputs every case may use; all of it must be byte-identical after a refused command."""
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / "ref.png")
    (tmp_path / "garbage.npy").write_bytes(b"not an array")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "keep.txt").write_text("mine")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "nan.npy", np.full((1, 4, 16, 16), np.nan, np.float32))
    np.save(tmp_path / "small.npy", np.zeros((1, 4, 8, 8), np.float32))
    np.savez(tmp_path / "embeds_bad.npz", adapter_0_negative=np.zeros((1, 7), np.float32),
             adapter_0_positive=np.zeros((1, 7), np.float32), adapter_0_variant=np.asarray("base"),
             adapter_0_feature=np.asarray("image_embeds"))
    (tmp_path / "existing.png").write_bytes(b"an earlier output")
    (tmp_path / "a_file").write_text("not a folder")
    return tmp_path


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(argv, capfd, root: Path, pattern: str, code: int = 2) -> str:
    before = _snapshot(root)
    got = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, err[-3000:]
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert got == code, (got, err[-2000:])
    assert len(errors) == 1 and re.search(pattern, errors[0]), err[-2000:]
    assert errors[0].rstrip().endswith("."), errors[0]
    after = _snapshot(root)
    assert {k: after.get(k) for k in before} == before  # every input and earlier output untouched
    return errors[0]


def _gen(tiny, *args):
    base, encoder, adapter = tiny
    return ["generate", "--base", base, "--image-encoder", encoder, "--adapter", adapter, "--steps", "1", *args]


# ------------------------------------------------------------------------------------------------ generate

GENERATE_BEFORE_LOADING = {  # refused before any model loads
    "zero images": (["--num-images", "0"], r"number of images must be an integer >= 1"),
    "zero steps": (["--steps", "0"], r"steps must be an integer in \[1, 1000\]"),
    "nan guidance": (["--guidance", "nan"], r"guidance must be a number >= 0, not nan"),
    "inf guidance": (["--guidance", "inf"], r"guidance must be a number >= 0, not inf"),
    "negative eta": (["--eta", "-5"], r"eta must be a number in \[0, 1\]"),
    "rescale above 1": (["--guidance-rescale", "2"], r"guidance_rescale must be a number in \[0, 1\]"),
    "strength 0": (["--strength", "0", "--init-image", "{work}/ref.png"], r"strength must be a number in \(0, 1\]"),
    "window reversed": (["--ip-start", "0.8", "--ip-end", "0.2"], r"IP window starts after it ends"),
    "window outside": (["--ip-end", "1.5"], r"IP window's end must be a number in \[0, 1\]"),
    "seed too large": (["--seed", str(2**32)], r"seed must be an integer in \[0, 4294967295\]"),
    "latents missing": (["--latents", "{work}/none.npy"], r"--latents .*none\.npy does not exist"),
    "latents folder": (["--latents", "{work}/folder"], r"--latents .*folder is a folder"),
    "latents garbage": (["--latents", "{work}/garbage.npy"], r"is not a readable \.npy array"),
    "latents objects": (["--latents", "{work}/objects.npy"], r"is not a readable \.npy array"),
    "latents nan": (["--latents", "{work}/nan.npy"], r"holds NaN or infinite values"),
    "face embeds garbage": (["--face-embeds", "{work}/garbage.npy"], r"face embedding .* not a readable"),
    "out exists": (["--out", "{work}/existing.png"], r"already exists; choose another --out or pass --overwrite"),
    "out is a folder": (["--out", "{work}/folder"], r"--out .*folder is a folder"),
    "out under a file": (["--out", "{work}/a_file/x.png"], r"cannot be created: .*a_file is a file"),
    "out is the input": (["--out", "{work}/ref.png", "--overwrite"], r"--out .*ref\.png is one of the inputs"),
    "latent to png": (["--output-type", "latent", "--out", "{work}/x.png"], r"must end in \.npy for latents"),
    "unknown image type": (["--out", "{work}/x.gif"], r"must end in \.png, \.jpg, \.jpeg or \.webp"),
    "save-embeds over input": (["--save-embeds", "{work}/ref.png"], r"--save-embeds .*ref\.png is one of the inputs"),
}

GENERATE_AFTER_LOADING = {  # refused once the models say what fits
    "nan scale": (["--scale", "nan"], r"IP-Adapter scales must be finite numbers"),
    "latents wrong shape": (["--latents", "{work}/small.npy"], r"initial latents must have shape"),
    "embeds garbage": (["--embeds", "{work}/garbage.npy"], r"is not a saved image-embeddings file"),
    "embeds folder": (["--embeds", "{work}/folder"], r"is a folder, not a saved image-embeddings file"),
    "embeds wrong width": (["--embeds", "{work}/embeds_bad.npz"], r"embeddings of shape \(1, 7\)"),
    "mask without init": (["--mask-image", "{work}/ref.png"], r"inpainting needs init_image"),
    "huge size": (["--height", "100000", "--width", "100000"], r"need at least .* GiB for the VAE decoder"),
    "huge count": (["--num-images", "100000", "--height", "1024", "--width", "1024"],
                   r"need at least .* GiB for the VAE decoder"),
}


@pytest.mark.parametrize("case", list(GENERATE_BEFORE_LOADING) + list(GENERATE_AFTER_LOADING))
def test_generate_refuses(tiny, work, capfd, case):
    extra, pattern = {**GENERATE_BEFORE_LOADING, **GENERATE_AFTER_LOADING}[case]
    extra = [a.format(work=work) for a in extra]
    if "--out" not in extra:
        extra += ["--out", str(work / "out.png")]
    _refused(_gen(tiny, "--image", work / "ref.png", *extra), capfd, work, pattern)
    assert not (work / "out.png").exists() and not (work / "x.png").exists()


def test_generate_writes_the_suffix_it_is_given(tiny, work):
    assert main([str(a) for a in _gen(tiny, "--image", work / "ref.png", "--out", work / "x.jpg")]) == 0
    assert Image.open(work / "x.jpg").format == "JPEG"
    assert main([str(a) for a in _gen(tiny, "--image", work / "ref.png", "--output-type", "latent",
                                      "--out", work / "lat")]) == 0
    assert (work / "lat.npy").exists() and not (work / "lat").exists()
    assert main([str(a) for a in _gen(tiny, "--image", work / "ref.png", "--out", work / "x.jpg",
                                      "--overwrite")]) == 0


# --------------------------------------------------------------------------------------------------- batch


def _manifest(path: Path, *items) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in items))
    return path


def _batch(tiny, manifest, out, *extra):
    base, encoder, adapter = tiny
    return ["batch", "--base", base, "--image-encoder", encoder, "--adapter", adapter, "--steps", "1",
            "--manifest", manifest, "--out", out, *extra]


@pytest.mark.parametrize("extra,pattern", [
    (["--batch-size", "-1"], r"--batch-size must be an integer >= 1"),
    (["--steps", "0"], r"steps must be an integer"),
    (["--distributed"], r"--distributed found no cluster"),
])
def test_batch_refuses_run_settings(tiny, work, capfd, extra, pattern):
    manifest = _manifest(work / "m.jsonl", {"id": "a", "images": "ref.png"})
    _refused(_batch(tiny, manifest, work / "out", *extra), capfd, work, pattern)


def test_batch_manifest_must_be_a_file(tiny, work, capfd):
    _refused(_batch(tiny, work / "folder", work / "out"), capfd, work, r"manifest .*folder is a folder")
    _refused(_batch(tiny, work / "none.jsonl", work / "out"), capfd, work, r"manifest .*none\.jsonl does not exist")


BAD_ITEMS = {  # id -> (item, what its failure says); each fails alone while the good item is written
    "steps-text": ({"steps": "ten"}, r"steps must be an integer"),
    "null-prompt": ({"prompt": None}, r"'prompt' must be text"),
    "float-seed": ({"seed": 1.5}, r"seed must be an integer"),
    "negative-seed": ({"seed": -1}, r"seed must be an integer"),
    "mask-no-init": ({"mask_image": "ref.png"}, r"'mask_image' needs 'init_image'"),
    "text-scale": ({"scale": "nan"}, r"IP-Adapter scale preset 'nan' is unknown"),
    "nan-scale": ({"scale": [float("nan")]}, r"IP-Adapter scales must be finite"),
    "reversed-window": ({"ip_window": [0.8, 0.2]}, r"starts after it ends"),
    "bad-scheduler": ({"scheduler": 3}, r"'scheduler' must be text"),
    "ref": ({}, r"its output .*ref\.png is one of the batch's inputs"),  # would overwrite the input ref.png
    "contact_sheet": ({}, r"reserved for --contact-sheet"),
    "existing": ({}, r"existing\.png exists and was not written by ipadapter-jax batch"),
}


def test_batch_bad_items_fail_alone(tiny, work, capfd):
    items = [{"id": "good", "images": "ref.png", "seed": 2}]
    items += [{"id": name, "images": "ref.png", **item} for name, (item, _) in BAD_ITEMS.items()]
    manifest = _manifest(work / "m.jsonl", *items, "{not json", '["a list"]', {"id": "good"})
    before = _snapshot(work)
    code = main([str(a) for a in _batch(tiny, manifest, work, "--contact-sheet")])  # --out = the manifest's folder
    out, err = capfd.readouterr()
    assert code == 1 and "Traceback" not in out + err
    failed = dict(re.findall(r"^  failed (.+?): (.*)$", err, re.M))
    for name, (_, pattern) in BAD_ITEMS.items():
        assert re.search(pattern, failed.pop(name)), name
    n = len(items)  # the three broken lines follow the items
    assert re.search(r"not valid JSON", failed.pop(f"line {n + 1}"))
    assert re.search(r"must be a JSON object", failed.pop(f"line {n + 2}"))
    assert re.search(r"id 'good' repeats line 1", failed.pop(f"line {n + 3}"))
    assert not failed, failed
    after = _snapshot(work)
    assert {k: after.get(k) for k in before} == before
    assert (work / "good.png").exists() and (work / "contact_sheet.png").exists()


def test_batch_resume_redoes_changed_items_only(tiny, work, capfd):
    items = [{"id": "a", "images": "ref.png", "prompt": "x", "seed": 1},
             {"id": "b", "images": "ref.png", "prompt": "y", "seed": 2}]
    manifest = _manifest(work / "m.jsonl", *items)
    assert main([str(a) for a in _batch(tiny, manifest, work / "out")]) == 0
    a, b = (work / "out" / "a.png").read_bytes(), (work / "out" / "b.png").read_bytes()
    _manifest(manifest, items[0], {**items[1], "prompt": "changed"})
    capfd.readouterr()
    assert main([str(a) for a in _batch(tiny, manifest, work / "out")]) == 0
    assert re.search(r"1 written \(1 regenerated: their settings changed\), 1 already done", capfd.readouterr().out)
    assert (work / "out" / "a.png").read_bytes() == a and (work / "out" / "b.png").read_bytes() != b
    assert json.loads((work / "out" / "b.json").read_text())["prompt"] == "changed"
    capfd.readouterr()
    assert main([str(a) for a in _batch(tiny, manifest, work / "out", "--steps", "2")]) == 0  # a new default
    assert re.search(r"2 written \(2 regenerated.*\), 0 already done", capfd.readouterr().out)


# ------------------------------------------------------------------------------------------------- convert


def test_convert_overwrite_replaces_only_adapter_folders(tiny, work, capfd):
    base, adapter = tiny[0], tiny[2]
    _refused(["convert", "to-flax", adapter, "--base", base, "--out", work / "folder", "--overwrite"], capfd, work,
             r"is not an ipadapter-jax adapter folder \(keep\.txt\); --overwrite replaces only such folders")
    assert main(["convert", "to-flax", str(adapter), "--base", str(base), "--out", str(work / "flax")]) == 0
    _refused(["convert", "to-flax", adapter, "--base", base, "--out", work / "flax"], capfd, work,
             r"already exists; .*--overwrite")
    assert main(["convert", "to-flax", str(adapter), "--base", str(base), "--out", str(work / "flax"),
                 "--overwrite"]) == 0
    _refused(["convert", "to-torch", work / "flax", "--out", work / "folder"], capfd, work,
             r"must end in \.safetensors or \.bin")
    _refused(["convert", "to-torch", work / "flax", "--out", work / "flax" / "x.safetensors"], capfd, work,
             r"lies inside the adapter folder")
    _refused(["convert", "to-flax", work / "garbage.npy", "--out", work / "new"], capfd, work,
             r"not a readable PyTorch checkpoint")


def test_convert_on_a_read_only_disk(tiny, work, capfd, monkeypatch):
    from ipadapter_jax.weights import ip_adapter_layout

    def read_only(tensors, path, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(ip_adapter_layout, "save_safetensors", read_only)
    assert main(["convert", "to-flax", str(tiny[2]), "--base", str(tiny[0]), "--out", str(work / "flax")]) == 0
    _refused(["convert", "to-torch", work / "flax", "--out", work / "x.safetensors"], capfd, work,
             r"error: Read-only file system \(.*x\.safetensors\); free space, fix the permissions")


# ---------------------------------------------------------------------------- prepare-data, cache-encoders


def test_prepare_data_refuses_a_foreign_folder_and_survives_a_full_disk(work, capfd, monkeypatch):
    from ipadapter_jax.data import synthetic, tfds_builder

    data = synthetic.write_synthetic_dataset(work / "images", 4, size=16, seed=0)
    _refused(["prepare-data", data.json_file, "--out", work / "folder"], capfd, work, r"is not empty and holds no")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(work / "prepared"))

    monkeypatch.setattr(tfds_builder, "move_into_place", full)
    _refused(["prepare-data", data.json_file, "--out", work / "prepared"], capfd, work,
             r"error: No space left on device \(.*prepared\); free space")
    assert not (work / "prepared").exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".prepared")]  # no partial folder left behind


def test_cache_encoders_overwrite_replaces_only_a_cache(tiny, work, capfd):
    config = work / "c.yaml"
    config.write_text(f"model:\n  base: {tiny[0]}\n  image_encoder: {tiny[1]}\ndata:\n  source: synthetic\n"
                      f"  cache: {work / 'folder'}\nworkdir: {work / 'run'}\n")
    _refused(["cache-encoders", "--config", config, "--overwrite"], capfd, work, r"is not an encoder cache")

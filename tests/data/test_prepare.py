"""Preparing TFDS datasets from the official JSON list and from caption folders, and reading them back."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from ipadapter_jax.data import reader, sources, tfds_builder
from ipadapter_jax.errors import ConfigError, UserError


def _png(path, colour, size=(20, 14), mode="RGB"):
    Image.new(mode, size, colour).save(path, format="PNG")
    return path


def _decode(value):
    return np.asarray(Image.open(io.BytesIO(value)))


def test_prepare_official_json_skips_broken_records(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    good = {f"g{i}.png": (10 * i, 50, 200) for i in range(4)}
    for name, colour in good.items():
        _png(root / name, colour)
    _png(root / "empty.png", (1, 2, 3))
    (root / "corrupt.png").write_bytes(_png(tmp_path / "x.png", (9, 9, 9)).read_bytes()[:40])  # truncated PNG
    entries = [{"image_file": name, "text": f"caption {name}"} for name in good]
    entries += [
        {"image_file": "corrupt.png", "text": "a corrupt image"},
        {"image_file": "missing.png", "text": "no such file"},
        {"image_file": "empty.png", "text": "   "},
        {"text": "no image_file key"},
    ]
    json_file = tmp_path / "train.json"
    json_file.write_text(json.dumps(entries))

    report = tfds_builder.prepare_dataset(json_file, tmp_path / "out", image_root=root, num_shards=2,
                                          progress=False)

    assert report.num_written == 4
    assert report.skipped == {
        sources.SKIP_UNREADABLE_IMAGE: 1,
        sources.SKIP_MISSING_IMAGE: 1,
        sources.SKIP_EMPTY_CAPTION: 1,
        sources.SKIP_MALFORMED_ENTRY: 1,
    }
    assert ("missing.png", sources.SKIP_MISSING_IMAGE) in report.skipped_examples
    assert "skipped 4" in report.summary()
    assert len(list((tmp_path / "out").glob("*.array_record-*-of-00002"))) == 2
    assert not report.has_face_embed
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temp folder cleaned up

    src = reader.open_source(tmp_path / "out")
    assert len(src) == 4 and not src.has_face_embed
    by_text = {src[i]["text"]: src[i]["image"] for i in range(len(src))}
    assert set(by_text) == {f"caption {name}" for name in good}
    for name, colour in good.items():
        pixels = _decode(by_text[f"caption {name}"])
        assert pixels.shape == (14, 20, 3)
        np.testing.assert_array_equal(pixels[0, 0], colour)


def test_prepare_caption_folder(tmp_path):
    folder = tmp_path / "captions"
    (folder / "sub").mkdir(parents=True)
    _png(folder / "a.png", (200, 0, 0))
    (folder / "a.txt").write_text("a red square\n")
    _png(folder / "sub" / "b.png", (0, 0, 0, 128), mode="RGBA")  # stored re-encoded as RGB
    (folder / "sub" / "b.txt").write_text("a transparent one")
    _png(folder / "c.png", 77, mode="L")
    (folder / "c.txt").write_text("grey")
    _png(folder / "nocaption.png", (1, 1, 1))
    _png(folder / "blank.png", (1, 1, 1))
    (folder / "blank.txt").write_text("\n")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "broken.txt").write_text("broken")

    report = tfds_builder.prepare_dataset(folder, tmp_path / "out", name="my_set", progress=False)

    assert report.num_written == 3
    assert report.skipped == {
        sources.SKIP_MISSING_CAPTION: 1,
        sources.SKIP_EMPTY_CAPTION: 1,
        sources.SKIP_UNREADABLE_IMAGE: 1,
    }
    src = reader.open_source(tmp_path / "out")
    records = {src[i]["text"]: _decode(src[i]["image"]) for i in range(len(src))}
    assert set(records) == {"a red square", "a transparent one", "grey"}
    assert all(image.shape == (14, 20, 3) for image in records.values())
    np.testing.assert_array_equal(records["a transparent one"][0, 0], (0, 0, 0))
    np.testing.assert_array_equal(records["grey"][0, 0], (77, 77, 77))
    assert (tmp_path / "out" / "my_set-train.array_record-00000-of-00001").is_file()


def test_prepare_face_embeddings(tmp_path, torch):
    for i in range(4):
        _png(tmp_path / f"{i}.png", (i, i, i))
    np.save(tmp_path / "0.npy", np.arange(512, dtype=np.float32))
    np.save(tmp_path / "1.npy", np.ones((1, 512), np.float64))  # (1, 512) as insightface gives
    np.save(tmp_path / "2.npy", np.ones(128, np.float32))  # wrong size
    torch.save(torch.full((512,), 3.0), tmp_path / "3.bin")  # torch file as the FaceID script reads
    entries = [{"image_file": f"{i}.png", "text": f"face {i}", "id_embed_file": f"{i}.{ext}"}
               for i, ext in enumerate(["npy", "npy", "npy", "bin"])]
    entries.append({"image_file": "0.png", "text": "no embedding"})
    (tmp_path / "faces.json").write_text(json.dumps(entries))

    report = tfds_builder.prepare_dataset(tmp_path / "faces.json", tmp_path / "out", progress=False)

    assert report.has_face_embed and report.num_written == 3
    assert report.skipped == {sources.SKIP_BAD_FACE_EMBED: 1, sources.SKIP_MISSING_FACE_EMBED: 1}
    src = reader.open_source(tmp_path / "out")
    assert src.has_face_embed
    embeds = {src[i]["text"]: src[i]["face_embed"] for i in range(len(src))}
    assert all(e.dtype == np.float32 and e.shape == (512,) for e in embeds.values())
    np.testing.assert_array_equal(embeds["face 0"], np.arange(512))
    np.testing.assert_array_equal(embeds["face 3"], np.full(512, 3.0))


def test_torch_face_embedding_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    _png(tmp_path / "0.png", (0, 0, 0))
    entry = {"image_file": "0.png", "text": "t", "id_embed_file": "0.bin"}
    (tmp_path / "l.json").write_text(json.dumps([entry]))
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="torch is not installed"):
        tfds_builder.prepare_dataset(tmp_path / "l.json", tmp_path / "out", progress=False)


def test_existing_dataset_needs_overwrite(tmp_path, synthetic_data):
    out = tmp_path / "out"
    tfds_builder.prepare_dataset(synthetic_data.json_file, out, progress=False)
    with pytest.raises(UserError, match="--overwrite"):
        tfds_builder.prepare_dataset(synthetic_data.json_file, out, progress=False)

    half = tmp_path / "half.json"
    half.write_text(json.dumps(json.loads(synthetic_data.json_file.read_text())[:5]))
    report = tfds_builder.prepare_dataset(half, out, image_root=synthetic_data.root, overwrite=True,
                                          progress=False)
    assert report.num_written == 5 and len(reader.open_source(out)) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half.json", "out"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        tfds_builder.prepare_dataset(half, other, image_root=synthetic_data.root, overwrite=True,
                                     progress=False)
    assert (other / "notes.txt").read_text() == "keep me"


def test_interrupted_prepare_leaves_no_half_dataset(tmp_path, synthetic_data, monkeypatch):
    out = tmp_path / "out"
    tfds_builder.prepare_dataset(synthetic_data.json_file, out, progress=False)
    before = sorted(p.name for p in out.iterdir())
    calls = []

    def interrupted(item, *, with_face_embed):
        calls.append(item)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(item, with_face_embed=with_face_embed)

    real = sources.load_example
    monkeypatch.setattr(sources, "load_example", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tfds_builder.prepare_dataset(synthetic_data.json_file, out, overwrite=True, progress=False)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        tfds_builder.prepare_dataset(synthetic_data.json_file, tmp_path / "new", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == before
    assert len(reader.open_source(out)) == synthetic_data.num_images


def test_no_usable_records_is_an_error(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps([{"image_file": "missing.png", "text": "x"}]))
    with pytest.raises(UserError, match="No usable records"):
        tfds_builder.prepare_dataset(tmp_path / "l.json", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.json"]


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        tfds_builder.prepare_dataset(tmp_path / "nope.json", tmp_path / "out", progress=False)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        tfds_builder.prepare_dataset(tmp_path / "bad.json", tmp_path / "out", progress=False)
    (tmp_path / "dict.json").write_text("{}")
    with pytest.raises(UserError, match="not a list"):
        tfds_builder.prepare_dataset(tmp_path / "dict.json", tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="snake_case"):
        tfds_builder.prepare_dataset(tmp_path / "dict.json", tmp_path / "o", name="Bad-Name", progress=False)


def test_open_source_errors_name_what_exists(prepared_dir, tmp_path):
    with pytest.raises(UserError, match=r"no text feature 'caption'.*\['image', 'text'\]"):
        reader.open_source(prepared_dir, text_key="caption")
    with pytest.raises(UserError, match=r"no image feature 'jpg'"):
        reader.open_source(prepared_dir, image_key="jpg")
    with pytest.raises(UserError, match=r"no split 'validation'.*\['train'\]"):
        reader.open_source(prepared_dir, split="validation")
    with pytest.raises(UserError, match="no prepared TFDS dataset"):
        reader.open_source(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        reader.open_source(tmp_path / "missing")
    with pytest.raises(UserError, match="neither a dataset folder nor a TFDS dataset name"):
        reader.open_source("surely_not_a_dataset_name", data_dir=tmp_path)
    with pytest.raises(UserError, match="neither a dataset folder nor a TFDS dataset name"):
        reader.open_source("relative/missing_folder")


def test_open_source_finds_a_tfds_data_dir_layout(prepared_dir, tmp_path):
    # A TFDS data_dir (name/version/...) as tfds.builder(...).download_and_prepare leaves it.
    import shutil

    shutil.copytree(prepared_dir, tmp_path / "ip_adapter_images" / "1.0.0")
    src = reader.open_source(tmp_path, split="train[:50%]")
    assert len(src) == 12 and isinstance(src[0]["text"], str)

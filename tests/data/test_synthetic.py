"""The synthetic dataset: images show what their captions say, in both source formats."""

import json

import numpy as np
from PIL import Image

from ipadapter_jax.data import sources, synthetic


def test_images_match_captions_and_both_formats_list_them(tmp_path):
    data = synthetic.write_synthetic_dataset(tmp_path, 6, size=32, seed=3, face_embeds=True)
    entries = json.loads(data.json_file.read_text())
    assert len(entries) == data.num_images == 6
    for entry in entries:
        words = entry["text"].split()  # "a {fg} {shape} on a {bg} background"
        fg, shape, bg = words[1], words[2], words[5]
        assert shape in synthetic.SHAPES
        pixels = np.asarray(Image.open(tmp_path / entry["image_file"]))
        colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
        assert {tuple(c) for c in colours} == {synthetic.COLOURS[fg], synthetic.COLOURS[bg]}
        assert tuple(colours[np.argmax(counts)]) == synthetic.COLOURS[bg]
        assert (tmp_path / entry["image_file"]).with_suffix(".txt").read_text().strip() == entry["text"]
        embed = np.load(tmp_path / entry["id_embed_file"])
        assert embed.shape == (512,) and abs(np.linalg.norm(embed) - 1) < 1e-5

    from_json = sources.list_source(data.json_file)
    from_folder = sources.list_source(tmp_path)
    assert [i.image_path for i in from_json] == [i.image_path for i in from_folder]
    again = synthetic.write_synthetic_dataset(tmp_path / "again", 6, size=32, seed=3)
    assert [e["text"] for e in json.loads(again.json_file.read_text())] == [e["text"] for e in entries]

"""Our `tokenizers`-built CLIP tokenizer (data/clip_tokenizer.py) gives transformers' CLIPTokenizer's ids, padding,
truncation and decoding on the tokenizer folders Stable Diffusion pipelines ship (pad with <|endoftext|>, and "!"
as SDXL's second tokenizer), with merges that exercise BPE."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import CLIPTokenizer

from ipadapter_jax.data.clip_tokenizer import ClipTokenizer
from ipadapter_jax.data.transforms import load_tokenizer
from ipadapter_jax.tiny_models import write_tiny_tokenizer

TEXTS = ["a photo of a cat", "A  Photo\tof a\nCAT ", "", "   ", "it's what we'll do, isn't it?", "café naïve résumé",
         "猫と犬 🐱🐶", "2024-11-30: 3.14 x 42!!", "<|endoftext|> in the middle <|startoftext|>", "the andthe theand",
         "hello...world;;; (((masterpiece))) [foo:bar:0.5]", "ＦＵＬＬ width", "e\u0301 combining"]
LONG = "a very long prompt " * 40
MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("c", "a"), ("ca", "t</w>"), ("p", "h"),
          ("ph", "o"), ("pho", "t"), ("phot", "o</w>"), ("o", "f</w>"), ("a</w>", "a")]


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"])
def folder(request, tmp_path_factory):
    folder = write_tiny_tokenizer(tmp_path_factory.mktemp("tok"), pad_token=request.param)
    vocab = json.loads((folder / "vocab.json").read_text())
    for a, b in MERGES[4:]:  # more merges than the tiny writer's, so that BPE has work to do
        vocab.setdefault(a + b, len(vocab))
    # keep the special tokens last, as in CLIP's vocabulary
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = vocab.pop(special)
    vocab = {k: i for i, k in enumerate(vocab)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in MERGES) + "\n")
    return folder


def test_same_ids_as_transformers(folder):
    ours, ref = ClipTokenizer.from_folder(folder), CLIPTokenizer.from_pretrained(str(folder))
    assert ours is not None and ours.model_max_length == ref.model_max_length == 77
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (ref.bos_token_id, ref.eos_token_id,
                                                                          ref.pad_token_id)
    for text in [*TEXTS, LONG]:
        assert ours(text).input_ids == ref(text).input_ids, text
    for kwargs in (dict(padding="max_length", max_length=77, truncation=True), dict(padding="longest"),
                   dict(padding="max_length", max_length=20, truncation=True)):
        assert ours([*TEXTS, LONG], **kwargs).input_ids == ref([*TEXTS, LONG], **kwargs).input_ids, kwargs
    np.testing.assert_array_equal(ours("", max_length=77, padding="max_length", truncation=True,
                                       return_tensors="np").input_ids,
                                  ref("", max_length=77, padding="max_length", truncation=True,
                                      return_tensors="np").input_ids)
    ids = ref([LONG]).input_ids[0]
    assert ours.decode(ids[70:90]) == ref.decode(ids[70:90])
    assert ours.decode(ref(TEXTS[4]).input_ids) == ref.decode(ref(TEXTS[4]).input_ids)


def test_loading_prefers_ours_and_falls_back_to_transformers(folder, tmp_path):
    assert isinstance(load_tokenizer(str(folder)), ClipTokenizer)
    other = write_tiny_tokenizer(tmp_path / "other")
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "do_lower_case": False}))
    assert ClipTokenizer.from_folder(other) is None
    assert isinstance(load_tokenizer(str(other)), CLIPTokenizer)

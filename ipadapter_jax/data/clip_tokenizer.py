"""CLIP's byte-level BPE tokenizer built directly on the `tokenizers` library, without importing transformers.

transformers' `CLIPTokenizer` (v5, and the fast one of v4) builds exactly this pipeline from a folder's
`vocab.json` and `merges.txt`: NFC, whitespace runs to one space, lower case; CLIP's word pattern; byte-level
symbols; BPE with the `</w>` word suffix; `<|startoftext|>` ... `<|endoftext|>` around every text. Importing
transformers takes about a second in a new process, longer than the rest of loading a pipeline from the
converted-weights cache, and generation needs nothing else from it. A folder this module does not cover (no
vocab/merges, another tokenizer class, no lower-casing) is loaded by transformers instead
(`data/transforms.load_tokenizer`); `tests/data/test_clip_tokenizer.py` holds both to the same ids.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
SUFFIX = "</w>"
_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
_DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
             "pad_token": "<|endoftext|>"}


@dataclasses.dataclass(frozen=True)
class Encoded:
    input_ids: list | np.ndarray


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


class ClipTokenizer:
    """The calls this project makes on a transformers CLIP tokenizer: `tok(texts, padding=..., max_length=...,
    truncation=..., return_tensors=...)`, `decode(ids)` and `model_max_length`."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *, model_max_length: int,
                 special: dict[str, str]):
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                end_of_word_suffix=SUFFIX, fuse_unk=False, unk_token=special["unk_token"]))
        backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                   normalizers.Lowercase()])
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(t, special=True) for t in dict.fromkeys(special.values())])
        self._backend = backend
        self.model_max_length = model_max_length
        ids = {name: backend.token_to_id(token) for name, token in special.items()}
        if None in ids.values():
            raise ValueError(f"special tokens missing from vocab.json: {special}")
        self.bos_token_id, self.eos_token_id, self.pad_token_id = ids["bos_token"], ids["eos_token"], ids["pad_token"]

    @classmethod
    def from_folder(cls, folder: str | Path) -> ClipTokenizer | None:
        """The tokenizer in `folder`, or None when it is not one this module reproduces."""
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
            return None
        if config.get("tokenizer_class", "CLIPTokenizer") not in _CLASSES or not config.get("do_lower_case", True):
            return None
        if any(k in config for k in ("additional_special_tokens", "extra_special_tokens")) or \
                len(config.get("added_tokens_decoder", {})) > 2:
            return None  # added tokens (e.g. textual inversion): transformers knows how they split
        special_map = _read_json(folder / "special_tokens_map.json")
        special = {k: _content(config.get(k)) or _content(special_map.get(k)) or v for k, v in _DEFAULTS.items()}
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        if any(len(m) != 2 for m in merges):
            return None
        return cls(vocab, merges, model_max_length=int(config.get("model_max_length", 77)), special=special)

    def _ids(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def __call__(self, text: str | Sequence[str], *, padding: bool | str = False, max_length: int | None = None,
                 truncation: bool = False, return_tensors: str | None = None) -> Encoded:
        texts = [text] if isinstance(text, str) else list(text)
        rows = []
        for t in texts:
            ids = self._ids(t)
            if truncation:
                ids = ids[: max(0, (max_length or self.model_max_length) - 2)]
            rows.append([self.bos_token_id, *ids, self.eos_token_id])
        width = {"max_length": max_length or self.model_max_length, "longest": max(map(len, rows)),
                 True: max(map(len, rows)), False: 0}[padding]
        rows = [r + [self.pad_token_id] * (width - len(r)) for r in rows]
        if return_tensors == "np":
            return Encoded(np.asarray(rows, np.int64))
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r}: only 'np' or None")
        return Encoded(rows[0] if isinstance(text, str) else rows)

    def decode(self, ids) -> str:
        text = self._backend.decode([int(i) for i in ids], skip_special_tokens=False)
        return text.replace(SUFFIX, " ").strip()

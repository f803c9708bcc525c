"""CLIP-I and CLIP-T as the IP-Adapter paper reports them (§4.2.1), with OpenAI CLIP ViT-L/14 by default.

- CLIP-I(generated, reference) = cos(E_I(generated), E_I(reference)): CLIP image embeddings (`image_embeds`).
- CLIP-T(generated, caption) = cos(E_I(generated), E_T(caption)), reported raw and as CLIPScore
  (Hessel et al. 2021) = 2.5 * max(cos, 0). The paper's CLIP-T values (0.42-0.61) are on the CLIPScore scale:
  ViT-L/14 image-caption cosines sit around 0.2-0.3. torchmetrics' `CLIPScore` is 100 * max(cos, 0).

Both towers (with their projections) load from one transformers `CLIPModel` folder or hub id into this
project's Flax CLIP models; images are preprocessed as transformers' `CLIPProcessor` does (the folder's
`preprocessor_config.json`), captions tokenized by its tokenizer to the text model's length (padding after
the end token cannot change the pooled embedding: the text model is causal). Embeddings are computed
data-parallel: parameters replicated on a mesh of every device, each batch split over it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ipadapter_jax.data.clip_pixels import clip_pixels
from ipadapter_jax.errors import UserError
from ipadapter_jax.weights.diffusers_models import load_image_encoder, load_text_encoder
from ipadapter_jax.weights.hub import resolve

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
CLIPSCORE_WEIGHT = 2.5  # Hessel et al.'s w


def clipscore(cosine: np.ndarray) -> np.ndarray:
    """CLIPScore = 2.5 * max(cos, 0) (the paper's CLIP-T scale)."""
    return CLIPSCORE_WEIGHT * np.maximum(np.asarray(cosine, np.float64), 0.0)


def _unit(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPScorer:
    """Unit CLIP embeddings of images and captions, and the paper's scores from them."""

    def __init__(self, text_model, vision_model, tokenizer, processor, *, mesh: Mesh | None = None,
                 batch_size: int = 32):
        self.tokenizer = tokenizer
        self.processor = processor
        self.mesh = mesh or Mesh(np.asarray(jax.devices()), ("data",))
        self.batch_size = max(batch_size - batch_size % self.mesh.size, self.mesh.size)
        self.max_length = text_model.max_length
        replicated = NamedSharding(self.mesh, P())
        self._batch = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))  # over every device of any mesh
        text_graph, text_state = nnx.split(text_model)
        vision_graph, vision_state = nnx.split(vision_model)
        self._text_state = jax.device_put(text_state, replicated)
        self._vision_state = jax.device_put(vision_state, replicated)
        # Embeddings come back whole to every process (they are small): multi-host safe.
        self._text = jax.jit(lambda s, ids: _unit(nnx.merge(text_graph, s)(ids).text_embeds),
                             out_shardings=replicated)
        self._vision = jax.jit(lambda s, px: _unit(nnx.merge(vision_graph, s)(px).image_embeds),
                               out_shardings=replicated)

    @classmethod
    def from_pretrained(cls, clip: str | Path = DEFAULT_CLIP, *, dtype: str = "float32", mesh: Mesh | None = None,
                        batch_size: int = 32) -> CLIPScorer:
        """Both towers of a transformers `CLIPModel` (a folder or hub id) with its tokenizer and processor."""

        folder = resolve(clip, what="CLIP model")
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder} has no config.json; pass a transformers CLIPModel folder or hub id "
                            f"(e.g. {DEFAULT_CLIP}).")
        text = load_text_encoder(folder, dtype=dtype, with_projection=True)  # text_projection is required
        vision = load_image_encoder(folder, dtype=dtype)
        return cls(text, vision, _tokenizer(folder), clip_pixels(folder, vision.image_size),
                   mesh=mesh, batch_size=batch_size)

    def _batches(self, rows: np.ndarray, fn, state) -> np.ndarray:
        out = []
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i : i + self.batch_size]
            pad = -len(chunk) % self.mesh.size
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk
            placed = jax.make_array_from_callback(padded.shape, self._batch, lambda index, rows=padded: rows[index])
            out.append(np.asarray(fn(state, placed).addressable_data(0))[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def pixel_values(self, images: Sequence) -> np.ndarray:
        """(N, 3, S, S) float32: `CLIPProcessor` preprocessing of PIL images."""
        return np.asarray(self.processor(images=list(images), return_tensors="np")["pixel_values"], np.float32)

    def image_embeddings(self, images: Sequence) -> np.ndarray:
        """(N, P) unit image embeddings of PIL images (preprocessed in chunks as they are embedded)."""
        images = list(images)
        chunks = [self.pixel_values(images[i : i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        if not chunks:
            return np.zeros((0, 0), np.float32)
        return self._batches(np.concatenate(chunks), self._vision, self._vision_state)

    def token_ids(self, captions: Sequence[str]) -> np.ndarray:
        ids = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length, truncation=True)
        return np.asarray(ids["input_ids"], np.int32)

    def text_embeddings(self, captions: Sequence[str]) -> np.ndarray:
        """(N, P) unit text embeddings (captions longer than the text model are truncated, as torchmetrics)."""
        return self._batches(self.token_ids(captions), self._text, self._text_state)


def _tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{folder} has no readable CLIP tokenizer ({e}); pass a full CLIPModel folder with "
                        "vocab.json and merges.txt.") from None


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of unit embeddings, in float64 (the sum of P float32 products)."""
    return np.sum(np.asarray(a, np.float64) * np.asarray(b, np.float64), axis=-1)

"""CLIP-I / CLIP-T against transformers' CLIPModel and torchmetrics' CLIPScore, on a tiny random CLIPModel
folder in the transformers format (config, weights, tokenizer, image processor)."""

from __future__ import annotations

import numpy as np
from PIL import Image
from reference_models import rel_err

from ipadapter_jax.evaluation.clip_scores import CLIPScorer, clipscore, cosine

TOL = 1e-5
CAPTIONS = ["a red square", "two cats on a sofa, one asleep", "", "x" * 200]  # empty; longer than 77 tokens


def _images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 48), (32, 32), (57, 33), (64, 64)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8)) for i in range(n)]


def test_embeddings_and_scores_match_transformers(clip_folder, torch):
    from transformers import CLIPProcessor

    folder, ref = clip_folder
    scorer = CLIPScorer.from_pretrained(folder)
    assert scorer.mesh.size == 8 and scorer.batch_size % 8 == 0
    generated, references = _images(11, 0), _images(11, 1)  # 11: the last chunk is padded to the devices
    processor = CLIPProcessor.from_pretrained(folder)
    pixels = processor(images=generated, return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(scorer.pixel_values(generated), pixels)
    with torch.no_grad():
        def image_features(images):
            px = processor(images=images, return_tensors="pt")["pixel_values"]
            return ref.visual_projection(ref.vision_model(pixel_values=px).pooler_output).numpy()

        text = processor(text=CAPTIONS, return_tensors="pt", padding=True, truncation=True, max_length=77)
        want_text = ref.text_projection(ref.text_model(**text).pooler_output).numpy()
        want_gen, want_ref = image_features(generated), image_features(references)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    ours_gen, ours_ref = scorer.image_embeddings(generated), scorer.image_embeddings(references)
    ours_text = scorer.text_embeddings(CAPTIONS)
    errs = {"image": rel_err(ours_gen, unit(want_gen)), "text": rel_err(ours_text, unit(want_text)),
            "clip_i": rel_err(cosine(ours_gen, ours_ref), cosine(unit(want_gen), unit(want_ref)))}
    pairs = np.arange(len(CAPTIONS)) % len(CAPTIONS)
    errs["clip_t"] = rel_err(cosine(ours_gen[: len(CAPTIONS)], ours_text[pairs]),
                             cosine(unit(want_gen[: len(CAPTIONS)]), unit(want_text[pairs])))
    print(errs)
    assert max(errs.values()) < TOL, errs


def test_clip_t_matches_torchmetrics_clipscore(clip_folder, torch, tmp_path):
    """On the model and on a copy with the text projection negated (every cosine changes sign), so both sides
    of CLIPScore's max(cos, 0) are compared. Captions within 77 tokens: torchmetrics cuts longer token
    sequences after tokenizing, dropping the end token the text model pools at; we truncate as CLIPProcessor
    (truncation=True) and the Stable Diffusion pipelines do, keeping it (compared with transformers above)."""
    import shutil

    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    folder, ref = clip_folder
    flipped = tmp_path / "flipped"
    shutil.copytree(folder, flipped)
    with torch.no_grad():
        ref.text_projection.weight.neg_()
        ref.save_pretrained(flipped)
        ref.text_projection.weight.neg_()

    class Features(torch.nn.Module):
        """torchmetrics 1.9 expects get_*_features to return tensors; transformers 5 returns output objects
        whose pooler_output is the projected embedding."""

        def __init__(self, path):
            super().__init__()
            self.clip = CLIPModel.from_pretrained(path).eval()
            self.config = self.clip.config

        def get_image_features(self, *args, **kwargs):
            out = self.clip.get_image_features(*args, **kwargs)
            return getattr(out, "pooler_output", out)

        def get_text_features(self, *args, **kwargs):
            out = self.clip.get_text_features(*args, **kwargs)
            return getattr(out, "pooler_output", out)

    images = _images(3, 2)
    captions = CAPTIONS[:-1]
    pairs = [(i, c) for i in range(len(images)) for c in range(len(captions))]
    ours, want = [], []
    for path in (folder, flipped):
        scorer = CLIPScorer.from_pretrained(path)
        metric = CLIPScore(model_name_or_path=lambda path=path: (Features(path), CLIPProcessor.from_pretrained(path)))
        image_embeds, text_embeds = scorer.image_embeddings(images), scorer.text_embeddings(captions)
        ours += [float(cosine(image_embeds[i], text_embeds[c])) for i, c in pairs]
        for i, c in pairs:  # one pair at a time: torchmetrics returns the mean over what it is given
            metric.reset()
            score = metric(torch.from_numpy(np.array(images[i])).permute(2, 0, 1), captions[c])
            want.append(float(score.detach()))
    ours, want = np.asarray(ours), np.asarray(want)
    assert (ours > 0).any() and (ours < 0).any()
    err = rel_err(100.0 / 2.5 * clipscore(ours), want)
    print("clipscore rel err", err)
    assert err < TOL

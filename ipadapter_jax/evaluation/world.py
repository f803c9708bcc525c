"""Toy CLIP-I / CLIP-T on the shapes world: generate from held-out scenes and read the results exactly.

Each reference scene is generated from its own caption twice: with its image as the image prompt (IP scale
`scale`) and text only (scale 0, which is exactly the frozen base: lambda = 0 in eq. 5 of the paper). Toy
CLIP-I compares the generated attributes with the reference's image-only ones (colours, quadrant), toy CLIP-T
with the caption's (the shape); see `world.reader`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ipadapter_jax.images import to_pil
from ipadapter_jax.pipelines.image_prompt import ImagePrompt
from ipadapter_jax.pipelines.ip_adapter_pipeline import Noise
from ipadapter_jax.world.reader import IMAGE_ATTRIBUTES, read_attributes, toy_metrics
from ipadapter_jax.world.scenes import SIZE, Scene, render

STEPS, GUIDANCE = 20, 3.0


@dataclasses.dataclass
class ToyScores:
    clip_i: float
    clip_t: float
    attributes: dict[str, float]  # per attribute: fraction of images that agree with the reference / caption
    n: int
    images: list  # the generated PIL images

    def as_dict(self) -> dict:
        return {"clip_i": self.clip_i, "clip_t": self.clip_t, "attributes": self.attributes, "n": self.n}


def toy_scores(images: Sequence, scenes: Sequence[Scene]) -> ToyScores:
    m = toy_metrics([read_attributes(im) for im in images], [s.attributes() for s in scenes],
                    [s.caption for s in scenes])
    return ToyScores(clip_i=m["clip_i"], clip_t=m["clip_t"], attributes={k: m[k] for k in (*IMAGE_ATTRIBUTES, "shape")},
                     n=len(scenes), images=list(images))


def generate(pipe, scenes: Sequence[Scene], *, scale: float | Sequence[float], steps: int = STEPS,
             guidance: float = GUIDANCE, seed: int = 0, batch_size: int = 16,
             captions: Sequence[str] | None = None) -> list:
    """One image per scene from its caption (or `captions[i]`), with its rendering as the image prompt at `scale`
    (one value, or one per scene); scene i uses seed `seed + i`."""
    captions = [s.caption for s in scenes] if captions is None else list(captions)
    scales = [float(scale)] * len(scenes) if np.ndim(scale) == 0 else [float(s) for s in scale]

    batch_size = max(batch_size - batch_size % pipe.mesh.size, pipe.mesh.size)
    f = pipe.base.vae_scale_factor
    shape = (SIZE // f, SIZE // f, pipe.base.vae.config.latent_channels)
    out = []
    for i in range(0, len(scenes), batch_size):
        chunk = list(zip(scenes[i : i + batch_size], scales[i : i + batch_size], captions[i : i + batch_size],
                         strict=True))
        padded = chunk + [chunk[-1]] * (-len(chunk) % pipe.mesh.size)
        per_item = [[ImagePrompt(images=[render(s)], scale=x)] for s, x, _ in padded]
        pixels, _ = pipe.generate_batch([c for _, _, c in padded], None, [], per_item=per_item,
                                        noise=Noise.from_seeds([seed + i + k for k in range(len(padded))], shape),
                                        num_inference_steps=steps, guidance_scale=guidance, guidance_rescale=0.0,
                                        height=SIZE, width=SIZE)
        out.extend(to_pil(np.asarray(pixels))[: len(chunk)])
    return out


def evaluate_world(pipe, scenes: Sequence[Scene], *, scale: float = 1.0, steps: int = STEPS,
                   guidance: float = GUIDANCE, seed: int = 0) -> dict[str, ToyScores]:
    """{"image_prompt": scores at `scale`, "text_only": scores at scale 0} on the same scenes and seeds."""
    return {name: toy_scores(generate(pipe, scenes, scale=s, steps=steps, guidance=guidance, seed=seed), scenes)
            for name, s in (("image_prompt", scale), ("text_only", 0.0))}

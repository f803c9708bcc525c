"""The shapes world: the attribute reader is exact on every scene (and under pixel noise), the hand-set VAE
reconstructs scenes exactly in this project and in diffusers, and the toy metrics' chance level holds."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ipadapter_jax.world.reader import CHANCE_CLIP_I, caption_attributes, read_attributes, toy_clip_i, toy_clip_t
from ipadapter_jax.world.scenes import SIZE, Scene, describe, random_scene, render, render_cells, write_world_dataset


def _scenes(n, seed):
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(n)]


def test_reader_is_exact_on_scenes_and_robust_to_noise():
    rng = np.random.default_rng(1)
    for scene in _scenes(800, 0):
        image = render(scene)
        assert read_attributes(image) == scene.attributes(), scene
        noisy = np.asarray(image, np.int16) + rng.integers(-60, 61, (SIZE, SIZE, 3))
        assert read_attributes(np.clip(noisy, 0, 255).astype(np.uint8)) == scene.attributes(), scene
    assert read_attributes(Image.new("RGB", (SIZE, SIZE), (255, 0, 0)))["shape"] is None  # nothing drawn


def test_toy_metrics():
    a, b = _scenes(2, 3)
    ra = a.attributes()
    assert toy_clip_i(ra, ra) == 1.0 and toy_clip_t(ra, a.caption) == 1.0
    other = dict(ra, colour="x", quadrant="y")
    assert toy_clip_i(other, ra) == pytest.approx(1 / 3)
    assert caption_attributes("A Triangle") == {"shape": "triangle"}
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        caption_attributes("a cat")
    # A generator that ignores the reference agrees at chance level.
    scenes = _scenes(4000, 4)
    scores = [toy_clip_i(s.attributes(), r.attributes()) for s, r in zip(scenes[:2000], scenes[2000:], strict=True)]
    assert abs(np.mean(scores) - CHANCE_CLIP_I) < 0.02


def test_vae_reconstructs_scenes_exactly(tmp_path, torch):
    import jax.numpy as jnp
    from diffusers import AutoencoderKL

    from ipadapter_jax.weights.diffusers_models import load_vae
    from ipadapter_jax.world.vae import write_world_vae

    folder = write_world_vae(tmp_path / "vae")
    scenes = _scenes(8, 5)
    pixels = np.stack([np.asarray(render(s), np.float32) / 127.5 - 1.0 for s in scenes])
    vae = load_vae(folder)
    posterior = vae.encode(jnp.asarray(pixels))
    cells = np.stack([render_cells(s) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(np.asarray(posterior.mean)[..., :3], cells, atol=1e-5)
    assert float(np.max(posterior.logvar)) <= -29.9
    np.testing.assert_allclose(np.asarray(vae.decode(posterior.mean)), pixels, atol=1e-5)
    reference = AutoencoderKL.from_pretrained(folder).eval()
    with torch.no_grad():
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        decoded = reference.decode(reference.encode(x).latent_dist.mean).sample
    np.testing.assert_allclose(decoded.numpy(), x.numpy(), atol=1e-5)


def test_dataset_files(tmp_path):
    data = write_world_dataset(tmp_path / "d", 5, seed=2)
    assert len(data.scenes) == 5 and data.json_file.is_file()
    for i, scene in enumerate(data.scenes):
        assert read_attributes(Image.open(data.image(i))) == scene.attributes()
        assert (data.root / f"{i:05d}.txt").read_text().strip() == scene.caption


def test_descriptions_name_what_they_are_asked_to():
    scene = Scene(shape="circle", colour="red", background="blue", quadrant="top left", radius=2, centre=(4, 4))
    assert describe(scene) == "a red circle on blue at top left"
    assert describe(scene, set()) == scene.caption == "a circle"
    assert describe(scene, {"quadrant"}) == "a circle at top left"
    assert describe(scene, {"colour", "background"}) == "a red circle on blue"
    with pytest.raises(ValueError, match="cannot name"):
        describe(scene, {"shape"})
    from ipadapter_jax.world.base_training import SUBSETS

    assert len(set(SUBSETS)) == 8 and frozenset() in SUBSETS  # every subset, the shape alone included


def test_image_encoder_embedding_is_whitened(tmp_path):
    """The world encoder's image_embeds over new scenes: centred, and the background no longer dominates (a random
    encoder put 75% of the variance there and 2.4% in the shape's colour; see write_world_image_encoder)."""
    import jax
    import jax.numpy as jnp

    from ipadapter_jax.generation.image_features import image_processor_for, pixel_values
    from ipadapter_jax.weights.diffusers_models import load_image_encoder
    from ipadapter_jax.world.build import write_world_image_encoder
    from ipadapter_jax.world.scenes import COLOURS, random_scene, render

    folder = write_world_image_encoder(tmp_path / "enc")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    rng = np.random.default_rng(99)
    scenes = [random_scene(rng) for _ in range(600)]
    pixels = pixel_values(image_processor_for(folder), [render(s) for s in scenes])
    embeds = np.asarray(jax.jit(lambda m, x: m(x).image_embeds)(load_image_encoder(folder), jnp.asarray(pixels)),
                        np.float64)
    spread = np.sqrt(np.mean(np.var(embeds, axis=0)))
    assert np.linalg.norm(embeds.mean(0)) / np.sqrt(embeds.shape[1]) < 0.2 * spread  # centred
    centred = embeds - embeds.mean(0)

    def share(labels):  # variance explained by a one-hot least-squares fit
        onehot = np.asarray([[label == c for c in COLOURS] for label in labels], np.float64)
        fit = onehot @ np.linalg.lstsq(onehot, centred, rcond=None)[0]
        return np.sum((fit - fit.mean(0)) ** 2) / np.sum(centred ** 2)

    background, colour = share([s.background for s in scenes]), share([s.colour for s in scenes])
    assert background < 0.15 and colour > 0.01, (background, colour)

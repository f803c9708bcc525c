"""CLIP text and image encoders against transformers (PyTorch, CPU, float32) on tiny random checkpoints."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference_models import randomize_, rel_err, save_clip_text, save_clip_vision

from ipadapter_jax.errors import CheckpointError, ConfigError
from ipadapter_jax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from ipadapter_jax.weights.diffusers_models import load_image_encoder, load_text_encoder
from ipadapter_jax.weights.safetensors_io import SafetensorsFile, save_safetensors

TOL = 1e-5
TEXT = dict(vocab_size=600, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=16, projection_dim=24, bos_token_id=0)
# (a) OpenAI/SD1.x style: quick_gelu, legacy eos_token_id 2 -> pool at argmax(input_ids).
LEGACY = dict(TEXT, hidden_act="quick_gelu", eos_token_id=2)
# (b) a real EOS id that is not the largest id -> pool at its first occurrence.
EOS = 517
MODERN = dict(TEXT, hidden_act="gelu", eos_token_id=EOS)
VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
              num_attention_heads=4, projection_dim=24, hidden_act="gelu")


def _run(model, x):
    return nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x))


def _legacy_ids():
    """Prompts padded with the EOS token (the largest id), as SD1.x tokenizers do."""
    rng = np.random.default_rng(1)
    ids = np.full((2, 16), 599, np.int32)
    ids[:, 0] = 0
    ids[0, 1:6] = rng.integers(3, 599, 5)
    ids[1, 1:12] = rng.integers(3, 599, 11)
    return ids


def _modern_ids():
    """EOS (517) appears twice and larger ids follow it, so argmax(input_ids) would pick another token."""
    rng = np.random.default_rng(2)
    ids = rng.integers(3, 600, (2, 16)).astype(np.int32)
    ids[ids == EOS] = 3
    ids[:, 0] = 0
    ids[0, 4], ids[0, 9], ids[0, 11] = EOS, EOS, 599
    ids[1, 10], ids[1, 13], ids[1, 14] = EOS, 599, EOS
    assert (ids.argmax(-1) != (ids == EOS).argmax(-1)).all()
    return ids


@pytest.fixture(scope="module")
def text_folders(tmp_path_factory, torch):
    root = tmp_path_factory.mktemp("clip_text")
    legacy = save_clip_text(root / "legacy", LEGACY, with_projection=False, seed=1)
    modern = save_clip_text(root / "modern", MODERN, with_projection=True, seed=2)
    return {"legacy": (root / "legacy", legacy), "modern": (root / "modern", modern)}


@pytest.fixture(scope="module")
def vision_folder(tmp_path_factory, torch):
    root = tmp_path_factory.mktemp("clip_vision")
    return root, save_clip_vision(root, VISION, seed=3)


def _pixels():
    px = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    px[1] = 0.0  # the Plus adapters' unconditional input: all-zero normalised pixels
    return px


@pytest.mark.parametrize("name,ids_fn", [("legacy", _legacy_ids), ("modern", _modern_ids)])
def test_text_encoder_matches_transformers(text_folders, torch, name, ids_fn):
    folder, ref = text_folders[name]
    ids = ids_fn()
    model = load_text_encoder(folder)
    assert type(model) is (CLIPTextModelWithProjection if name == "modern" else CLIPTextModel)
    out = _run(model, ids)
    with torch.no_grad():
        t_ids = torch.from_numpy(ids).long()
        want = ref(t_ids, output_hidden_states=True)
        pooled = getattr(ref, "text_model", ref)(t_ids).pooler_output  # nested only with a projection
    assert len(out.hidden_states) == len(want.hidden_states) == TEXT["num_hidden_layers"] + 1
    errs = {
        "last_hidden_state": rel_err(out.last_hidden_state, want.last_hidden_state),
        "hidden_states[-2]": rel_err(out.hidden_states[-2], want.hidden_states[-2]),
        "hidden_states[0]": rel_err(out.hidden_states[0], want.hidden_states[0]),
        "pooler_output": rel_err(out.pooler_output, pooled),
    }
    if name == "modern":
        errs["text_embeds"] = rel_err(out.text_embeds, want.text_embeds)
    else:
        assert out.text_embeds is None
    print(name, errs)
    assert max(errs.values()) < TOL, errs


def test_image_encoder_matches_transformers(vision_folder, torch):
    folder, ref = vision_folder
    px = _pixels()
    model = load_image_encoder(folder)
    assert (model.image_size, model.hidden_size, model.projection_dim) == (32, 32, 24)
    out = _run(model, px)
    with torch.no_grad():
        want = ref(torch.from_numpy(px), output_hidden_states=True)
        pooled = ref.vision_model(torch.from_numpy(px)).pooler_output
    assert len(out.hidden_states) == len(want.hidden_states) == VISION["num_hidden_layers"] + 1
    errs = {
        "image_embeds": rel_err(out.image_embeds, want.image_embeds),
        "hidden_states[-2]": rel_err(out.hidden_states[-2], want.hidden_states[-2]),
        "hidden_states[0]": rel_err(out.hidden_states[0], want.hidden_states[0]),
        "last_hidden_state": rel_err(out.last_hidden_state, want.last_hidden_state),
        "pooler_output": rel_err(out.pooler_output, pooled),
    }
    print(errs)
    assert max(errs.values()) < TOL, errs


def test_full_clip_model_folder_loads_both_towers(tmp_path, torch):
    """A CLIPModel checkpoint: each loader takes its tower and the top-level projection_dim, skips the rest"""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=MODERN, vision_config=dict(VISION, projection_dim=512), projection_dim=20)
    ref = randomize_(CLIPModel(config), seed=4).eval()
    ref.save_pretrained(tmp_path)
    ids, px = _modern_ids(), _pixels()
    image = load_image_encoder(tmp_path)
    text = load_text_encoder(tmp_path)
    assert image.projection_dim == 20 and isinstance(text, CLIPTextModelWithProjection)
    with torch.no_grad():
        want_image = ref.visual_projection(ref.vision_model(torch.from_numpy(px)).pooler_output)
        want_text = ref.text_projection(ref.text_model(torch.from_numpy(ids).long()).pooler_output)
    errs = (rel_err(_run(image, px).image_embeds, want_image),
            rel_err(_run(text, ids).text_embeds, want_text))
    assert max(errs) < TOL, errs


def test_old_layout_with_position_ids_buffers_loads(text_folders, vision_folder, tmp_path):
    """Hub checkpoints (before transformers 4.31 / 5) prefix a bare text model's keys with `text_model.` and
    store the `position_ids` buffers; transformers 5 writes neither."""
    for src, prefix, n, load in [(text_folders["legacy"][0], "text_model", 16, load_text_encoder),
                                 (vision_folder[0], "vision_model", 17, load_image_encoder)]:
        dst = tmp_path / prefix
        shutil.copytree(src, dst)
        tensors = {k if k.startswith((prefix, "visual_projection")) else f"{prefix}.{k}": np.array(v)
                   for k, v in SafetensorsFile(src / "model.safetensors").items()}
        assert "text_model.final_layer_norm.weight" in tensors or prefix == "vision_model"
        tensors[f"{prefix}.embeddings.position_ids"] = np.arange(n, dtype=np.int64)[None]
        save_safetensors(tensors, dst / "model.safetensors")
        ours = nnx.state(load(dst))
        base = nnx.state(load(src))
        assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), ours, base))


def test_wrong_checkpoints_are_refused(text_folders, vision_folder, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(text_folders["legacy"][0], mixed)
    shutil.copy(vision_folder[0] / "model.safetensors", mixed / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected keys: vision_model"):
        load_text_encoder(mixed)
    with pytest.raises(ConfigError, match="not a CLIP image encoder"):
        load_image_encoder(text_folders["legacy"][0])
    with pytest.raises(ConfigError, match="not a CLIP text encoder"):
        load_text_encoder(vision_folder[0])
    # with_projection=False drops a checkpoint's projection on purpose; True on a plain one cannot load.
    assert type(load_text_encoder(text_folders["modern"][0], with_projection=False)) is CLIPTextModel
    with pytest.raises(CheckpointError, match="missing keys: text_projection.weight"):
        load_text_encoder(text_folders["legacy"][0], with_projection=True)
    config = json.loads((text_folders["modern"][0] / "config.json").read_text())
    bad = tmp_path / "bad_act"
    shutil.copytree(text_folders["modern"][0], bad)
    (bad / "config.json").write_text(json.dumps(dict(config, hidden_act="relu")))
    with pytest.raises(ConfigError, match="hidden_act"):
        load_text_encoder(bad)


def test_bfloat16_loads_and_runs(text_folders, vision_folder, torch):
    """Sanity bound only: bfloat16 weights and activations stay within a few percent of float32 PyTorch."""
    folder, ref = text_folders["modern"]
    ids = _modern_ids()
    out = _run(load_text_encoder(folder, dtype="bfloat16"), ids)
    assert out.text_embeds.dtype == jnp.bfloat16 and out.hidden_states[-2].dtype == jnp.bfloat16
    with torch.no_grad():
        want = ref(torch.from_numpy(ids).long(), output_hidden_states=True)
    assert rel_err(out.text_embeds.astype(jnp.float32), want.text_embeds) < 5e-2
    assert rel_err(out.hidden_states[-2].astype(jnp.float32), want.hidden_states[-2]) < 5e-2

    folder, ref = vision_folder
    px = _pixels()
    out = _run(load_image_encoder(folder, dtype="bfloat16"), px)
    assert out.image_embeds.dtype == jnp.bfloat16
    with torch.no_grad():
        want = ref(torch.from_numpy(px), output_hidden_states=True)
    assert rel_err(out.image_embeds.astype(jnp.float32), want.image_embeds) < 5e-2
    assert rel_err(out.hidden_states[-2].astype(jnp.float32), want.hidden_states[-2]) < 5e-2

"""The `ipadapter-jax` command on tiny checkpoints, and bad input: clear one-line errors, nothing half-written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from tiny_jobs import write_random_images, write_tiny_job

from ipadapter_jax.cli import main
from ipadapter_jax.errors import UserError
from ipadapter_jax.pipelines.ip_adapter_pipeline import IPAdapterPipeline
from ipadapter_jax.tiny_models import write_tiny_ip_adapter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base, encoder, adapter = write_tiny_job(root)
    ref = write_random_images(root, {"ref": 40})["ref"]
    return root, base, encoder, adapter, ref


def _models(base, encoder, adapter):
    return ["--base", str(base), "--image-encoder", str(encoder), "--adapter", str(adapter)]


def test_generate_png_and_latents_from_the_command_line(tiny, tmp_path, capsys):
    root, base, encoder, adapter, ref = tiny
    args = ["generate", *_models(base, encoder, adapter), "--image", str(ref), "--prompt", "a cat", "--steps", "2",
            "--seed", "3", "--scheduler", "ddim"]
    assert main([*args, "--num-images", "2", "--out", str(tmp_path / "img.png")]) == 0
    assert Image.open(tmp_path / "img-0.png").size == (64, 64) and (tmp_path / "img-1.png").exists()
    noise = np.random.default_rng(1).standard_normal((1, 4, 16, 16)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    assert main([*args, "--latents", str(tmp_path / "noise.npy"), "--output-type", "latent",
                 "--out", str(tmp_path / "final.npy")]) == 0
    final = np.load(tmp_path / "final.npy")
    assert final.shape == (1, 4, 16, 16) and np.isfinite(final).all()
    again = tmp_path / "again.npy"
    assert main([*args, "--latents", str(tmp_path / "noise.npy"), "--output-type", "latent", "--out", str(again)]) == 0
    np.testing.assert_array_equal(np.load(again), final)  # the given noise, not the seed, decides


def test_convert_round_trip_from_the_command_line(tiny, tmp_path):
    root, base, encoder, adapter, ref = tiny
    assert main(["convert", "to-flax", str(adapter), "--out", str(tmp_path / "flax"), "--base", str(base)]) == 0
    assert json.loads((tmp_path / "flax" / "ip_adapter.json").read_text())["spec"]["variant"] == "base"
    assert main(["convert", "to-torch", str(tmp_path / "flax"), "--out", str(tmp_path / "back.safetensors")]) == 0
    assert (tmp_path / "back.safetensors").read_bytes() != b""
    # an existing output is refused unless --overwrite, and left untouched
    before = (tmp_path / "back.safetensors").read_bytes()
    assert main(["convert", "to-torch", str(tmp_path / "flax"), "--out", str(tmp_path / "back.safetensors")]) == 2
    assert (tmp_path / "back.safetensors").read_bytes() == before


@pytest.mark.parametrize("problem,expected", [
    ("missing", "does not exist"),
    ("unreadable", "not a readable image"),
    ("size", "multiples of 4"),
])
def test_bad_generate_input_is_one_line_without_traceback(tiny, tmp_path, capsys, problem, expected):
    root, base, encoder, adapter, ref = tiny
    image, extra = str(ref), []
    if problem == "missing":
        image = str(tmp_path / "nope.png")
    elif problem == "unreadable":
        (tmp_path / "bad.png").write_bytes(b"not a png at all")
        image = str(tmp_path / "bad.png")
    else:
        extra = ["--height", "62"]
    code = main(["generate", *_models(base, encoder, adapter), "--image", image, "--steps", "1", *extra,
                 "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_overlong_prompt_is_truncated_with_a_warning(tiny):
    root, base, encoder, adapter, ref = tiny
    pipe = IPAdapterPipeline.from_pretrained(base, image_encoder=encoder, adapters=[adapter])
    long_prompt = "the cat and the dog " * 40
    with pytest.warns(UserWarning, match="truncated because CLIP can only handle sequences up to 77 tokens"):
        out = pipe(long_prompt, images=[ref], num_inference_steps=1, output_type="latent")
    assert out.latents.shape == (1, 4, 16, 16)


def test_mismatched_inputs_name_the_fix(tiny):
    root, base, encoder, adapter, ref = tiny
    pipe = IPAdapterPipeline.from_pretrained(base, image_encoder=encoder, adapters=[adapter])
    with pytest.raises(UserError, match="pass images"):
        pipe("x", num_inference_steps=1)
    with pytest.raises(UserError, match="1 IP-Adapters are loaded but 2 image prompts"):
        pipe("x", images=[ref, ref], num_inference_steps=1)
    with pytest.raises(UserError, match="initial latents must have shape"):
        pipe("x", images=[ref], num_inference_steps=1, latents=np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(UserError, match="inpainting needs init_image"):
        pipe("x", images=[ref], num_inference_steps=1, mask_image=ref)
    with pytest.raises(UserError, match="no image encoder was given"):
        IPAdapterPipeline.from_pretrained(base, adapters=[adapter])


def test_faceid_adapters_take_face_embeddings(tiny, tmp_path):
    root, base, encoder, adapter, ref = tiny
    faceid = write_tiny_ip_adapter(tmp_path / "faceid.safetensors", base, encoder, variant="faceid")
    pipe = IPAdapterPipeline.from_pretrained(base, adapters=[faceid])  # FaceID needs no image encoder
    face = np.random.default_rng(0).standard_normal((1, 512)).astype(np.float32)
    face /= np.linalg.norm(face)
    from ipadapter_jax.pipelines.image_prompt import ImagePrompt

    def run(embeds):
        return pipe("a face", images=[ImagePrompt(face_embeds=embeds)], num_inference_steps=2, seed=1,
                    output_type="latent").latents

    with_face, other = run(face), run(-face)
    assert np.isfinite(with_face).all() and not np.allclose(with_face, other)
    with pytest.raises(UserError, match="needs face embeddings"):
        pipe("a face", images=[ImagePrompt()], num_inference_steps=1)
    with pytest.raises(UserError, match="expects 512"):
        run(np.zeros((1, 128), np.float32))


@pytest.mark.parametrize("bf16_instructions", [False, True])
def test_bfloat16_generation_runs_close_to_float32(tiny, tmp_path, capsys, monkeypatch, bf16_instructions):
    """A sanity bound for reduced precision (not a parity check: bfloat16 keeps 8 bits of mantissa); on a CPU
    without bfloat16 instructions the command says once that bfloat16 may not be the fast choice there."""
    import ipadapter_jax.xla_flags

    monkeypatch.setattr(ipadapter_jax.xla_flags, "cpu_has_bfloat16", lambda: bf16_instructions)
    root, base, encoder, adapter, ref = tiny
    args = ["generate", *_models(base, encoder, adapter), "--image", str(ref), "--steps", "2", "--seed", "4",
            "--output-type", "latent"]
    assert main([*args, "--out", str(tmp_path / "f32.npy")]) == 0
    assert "bfloat16 instructions" not in capsys.readouterr().err
    assert main([*args, "--dtype", "bfloat16", "--out", str(tmp_path / "bf16.npy")]) == 0
    notes = capsys.readouterr().err.count("no bfloat16 instructions")
    assert notes == (0 if bf16_instructions else 1)
    f32, bf16 = np.load(tmp_path / "f32.npy"), np.load(tmp_path / "bf16.npy")
    assert np.isfinite(bf16).all()
    assert np.linalg.norm(bf16 - f32) / np.linalg.norm(f32) < 0.1

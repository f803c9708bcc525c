"""What a second run reuses: compiled programs (JAX's persistent cache, turned on by the CLI) and weights
converted to the Flax layout (weights/converted.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny_jobs import write_random_images, write_tiny_job

from ipadapter_jax.cli import main
from ipadapter_jax.pipelines.ip_adapter_pipeline import IPAdapterPipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    base, encoder, adapter = write_tiny_job(root)
    write_random_images(root, {"ref": 40, "mask_a": 40, "mask_b": 40})
    return root, base, encoder, adapter


def test_a_second_generate_compiles_nothing_new(tiny, tmp_path, monkeypatch):
    root, base, encoder, adapter = tiny
    monkeypatch.setenv("IPADAPTER_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("IPADAPTER_JAX_COMPILE_CACHE", raising=False)
    common = ["generate", "--base", str(base), "--image-encoder", str(encoder), "--adapter", str(adapter),
              "--image", str(root / "ref.png"), "--steps", "2", "--prompt", "a cat", "--no-weights-cache"]
    first = ["--scale", "0.5", "--guidance", "7.5", "--seed", "1", "--mask", str(root / "mask_a.png")]
    jax.clear_caches()  # each run as in a new process: programs compiled earlier in this one are not reused
    assert main([*common, *first, "--out", str(tmp_path / "a.png")]) == 0
    folder = tmp_path / "cache" / "jax"
    entries = set(p.name for p in folder.iterdir())
    assert len(entries) > 3  # the stages and the small programs around them
    jax.clear_caches()
    second = ["--scale", "0.8", "--guidance", "3.0", "--seed", "5", "--mask", str(root / "mask_b.png"),
              "--weight-type", "ease in", "--negative-prompt", "blurry"]
    assert main([*common, *second, "--out", str(tmp_path / "b.png")]) == 0
    assert set(p.name for p in folder.iterdir()) == entries
    assert not jax.config.jax_compilation_cache_dir  # the command's setting ends with it


def test_converted_weights_are_mapped_on_the_next_load(tiny, tmp_path):
    root, base, encoder, adapter = tiny
    base = Path(shutil.copytree(base, tmp_path / "sd15"))  # this test changes a file of its own copy
    cache = tmp_path / "weights"
    first = IPAdapterPipeline.from_pretrained(base, image_encoder=encoder, adapters=[adapter], weights_cache=cache)
    first.weights_cache.wait()
    assert len(list(cache.glob("*.json"))) == 4  # UNet, VAE, text encoder, image encoder
    again = IPAdapterPipeline.from_pretrained(base, image_encoder=encoder, adapters=[adapter], weights_cache=cache)
    assert not again.weights_cache.writers  # nothing converted: every model was mapped
    for a, b in zip(jax.tree.leaves(first._unet.state), jax.tree.leaves(again._unet.state), strict=True):
        np.testing.assert_array_equal(a, b)
    # A file changed in place is converted again (the others are still mapped); the file itself is only read.
    vae_file = base / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(vae_file.read_bytes())
    data[-4:] = np.float32(0.25).tobytes()
    vae_file.write_bytes(bytes(data))
    third = IPAdapterPipeline.from_pretrained(base, image_encoder=encoder, adapters=[adapter], weights_cache=cache)
    assert len(third.weights_cache.writers) == 1
    third.weights_cache.wait()
    assert vae_file.read_bytes() == bytes(data)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first._vae.state),
                                                        jax.tree.leaves(third._vae.state), strict=True)]
    assert sum(changed) == 1


def test_a_command_finishes_the_weights_cache_before_it_exits(tiny, tmp_path, monkeypatch, capsys):
    """The writers are daemon threads: a command that returned before them would leave the cache empty."""
    import time

    from ipadapter_jax.weights.converted import ConvertedWeights

    root, base, encoder, adapter = tiny
    monkeypatch.setenv("IPADAPTER_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("IPADAPTER_JAX_WEIGHTS_CACHE", raising=False)
    import threading

    import ipadapter_jax.images

    saved = threading.Event()  # the writers finish only after the command has written its image
    save, write = ipadapter_jax.images.save_image, ConvertedWeights._write
    monkeypatch.setattr(ipadapter_jax.images, "save_image", lambda *a, **k: (save(*a, **k), saved.set()))
    monkeypatch.setattr(ConvertedWeights, "_write", lambda self, *a: (saved.wait(60), time.sleep(0.2),
                                                                      write(self, *a)))
    assert main(["generate", "--base", str(base), "--image-encoder", str(encoder), "--adapter", str(adapter),
                 "--image", str(root / "ref.png"), "--steps", "1", "--prompt", "a cat", "--no-compile-cache",
                 "--out", str(tmp_path / "a.png")]) == 0
    assert len(list((tmp_path / "cache" / "weights").glob("*.json"))) == 4  # committed, not still being written
    assert "finishing the converted-weights cache" in capsys.readouterr().err

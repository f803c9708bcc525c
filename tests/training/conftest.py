"""Shared training fixtures: the tiny random base, a synthetic TFDS dataset, and one reference run on a single
device that the sharded, two-process, resume and encoder-cache tests compare against."""

from pathlib import Path

import jax
import pytest
from training.helpers import exported_tensors, make_config, persistent_cache

from ipadapter_jax.data import synthetic, tfds_builder
from ipadapter_jax.tiny_models import write_tiny_image_encoder, write_tiny_pipeline
from ipadapter_jax.training.loop import train


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory):
    """A JAX persistent compilation cache folder shared by the runs that compile the same step (reference,
    killed, resumed); enabled only around those runs (``helpers.persistent_cache``)."""
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_inputs")
    images = synthetic.write_synthetic_dataset(root / "images", 32, size=40, seed=3)
    tfds_builder.prepare_dataset(images.json_file, root / "tfds", progress=False)
    return {"base": write_tiny_pipeline(root / "sd15"), "encoder": write_tiny_image_encoder(root / "encoder"),
            "data": root / "tfds", "images": images.root}


@pytest.fixture(scope="session")
def reference_run(tiny_inputs, compilation_cache, tmp_path_factory):
    """The uninterrupted single-device run: a (1, 1) mesh on device 0."""
    workdir = tmp_path_factory.mktemp("reference")
    with persistent_cache(compilation_cache):
        return train(make_config(tiny_inputs, workdir), devices=jax.devices()[:1])


@pytest.fixture(scope="session")
def initial_adapter(tiny_inputs, tmp_path_factory):
    """The adapter every run starts from: a run of 0 steps exports it (and compiles nothing)."""
    workdir = tmp_path_factory.mktemp("initial")
    result = train(make_config(tiny_inputs, workdir, "total_steps=0"), devices=jax.devices()[:1])
    assert result.step == 0 and result.history == []
    return exported_tensors(workdir)

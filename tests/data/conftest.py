"""Shared data fixtures: a tiny tokenizer, a synthetic image+caption folder and its prepared TFDS dataset."""

import pytest

from ipadapter_jax.data import reader, synthetic, tfds_builder
from ipadapter_jax.tiny_models import write_tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    return synthetic.write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), 24, size=40, seed=1)


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, synthetic_data):
    out = tmp_path_factory.mktemp("prepared") / "ds"
    tfds_builder.prepare_dataset(synthetic_data.json_file, out, progress=False)
    return out


@pytest.fixture(scope="session")
def prepared_source(prepared_dir):
    return reader.open_source(prepared_dir)

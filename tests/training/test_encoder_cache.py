"""The encoder cache: built once, it gives the uncached run's losses (same records, drops and draws; only
the UNet and adapter run per step), and a cache built for another setup is refused."""

import dataclasses

import jax
import pytest
from training.helpers import make_config, rel_diff

from ipadapter_jax.errors import ConfigError
from ipadapter_jax.training.encoder_cache import CacheSource, build_encoder_cache
from ipadapter_jax.training.loop import train


@pytest.fixture(scope="module")
def cache_dir(tiny_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "cache"
    config = make_config(tiny_inputs, out.parent / "unused")
    report = build_encoder_cache(config, out, batch_size=8, progress=False)
    assert report.num_records == 32 and report.num_invalid == 0
    return out


def test_cache_records_in_source_order(cache_dir):
    source = CacheSource(cache_dir)
    assert len(source) == 32
    record = source[5]
    assert int(record["record_index"]) == 5 and bool(record["valid"])
    assert record["moments"].shape == (8, 8, 8)  # 32 px -> 8x8 latents, mean + logvar of 4 channels
    assert record["text"].shape == (77, 32) and record["image"].shape == (24,)


def test_cached_run_gives_the_uncached_losses(tiny_inputs, reference_run, cache_dir, tmp_path):
    result = train(make_config(tiny_inputs, tmp_path, f"data.cache={cache_dir}"), devices=jax.devices()[:1])
    assert rel_diff(result.losses, reference_run.losses) < 1e-5, (result.losses, reference_run.losses)


def test_mismatched_cache_is_refused(tiny_inputs, cache_dir, tmp_path):
    config = make_config(tiny_inputs, tmp_path, f"data.cache={cache_dir}")
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, resolution=64))
    with pytest.raises(ConfigError, match="resolution"):
        train(config, devices=jax.devices()[:1])

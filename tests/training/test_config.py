"""Typed YAML configs with dotted overrides: coercion, and errors that name the unknown or bad key."""

from pathlib import Path

import pytest

from ipadapter_jax.config import dump_yaml, load_config
from ipadapter_jax.errors import ConfigError
from ipadapter_jax.training.config import TrainConfig, load_train_config

RECIPES = sorted((Path(__file__).parents[2] / "train").glob("*.yaml"))


def test_defaults_are_the_official_recipe():
    c = load_train_config(None)
    assert (c.optimizer.lr, c.optimizer.weight_decay, c.global_batch_size) == (1e-4, 1e-2, 8)
    assert (c.data.p_drop_image, c.data.p_drop_text, c.data.p_drop_both) == (0.05, 0.05, 0.05)
    assert c.optimizer.grad_clip_norm is None and c.optimizer.schedule == "constant"


def test_yaml_then_overrides_with_coercion(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("total_steps: 10\noptimizer:\n  lr: 1e-4\nmodel:\n  variant: plus\n")
    c = load_train_config(path, ["optimizer.lr=3e-4", "mesh.fsdp=4", "optimizer.grad_clip_norm=1",
                                 "checkpoint.async_save=false", "monitor.sample_prompts=[a cat, 'a dog']",
                                 "model.init_adapter=null", "data.source=123", "total_steps=2_000"])
    assert c.total_steps == 2000 and c.model.variant == "plus"
    assert c.optimizer.lr == 3e-4 and isinstance(c.optimizer.lr, float)  # YAML reads 1e-4 as a string
    assert c.mesh.fsdp == 4 and c.optimizer.grad_clip_norm == 1.0 and c.checkpoint.async_save is False
    assert c.monitor.sample_prompts == ("a cat", "a dog") and c.model.init_adapter is None
    assert c.data.source == "123"  # str fields take the override's text as it is
    assert load_config(TrainConfig, None, [f"{k}={v}" for k, v in _flat(dump_yaml(c))]) == c


def _flat(text):
    import yaml

    def walk(prefix, node):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                yield from walk(key + ".", v)
            elif isinstance(v, list):
                yield key, yaml.safe_dump(v, default_flow_style=True).strip()
            else:
                yield key, "null" if v is None else v

    return list(walk("", yaml.safe_load(text)))


@pytest.mark.parametrize("override,match", [
    ("optimizer.lrr=1", r"Unknown config key 'optimizer.lrr'; did you mean 'optimizer.lr'\?"),
    ("optimiser.lr=1", r"Unknown config key 'optimiser'; did you mean 'optimizer'\?"),
    ("total_steps.x=1", r"'total_steps' is a value, not a section"),
    ("total_steps=many", r"'total_steps' expects int, got 'many'"),
    ("model.variant=huge", r"'model.variant' must be one of 'base', 'plus', 'full'"),
    ("optimizer.lr", r"not of the form key=value"),
    ("mesh.data=0", r"mesh sizes"),
    ("global_batch_size=6", r"not a multiple of optimizer.grad_accum_steps"),
    ("checkpoint.every_steps=0", r"checkpoint.every_steps must be >= 1"),
    ("monitor.log_every_steps=0", r"monitor.log_every_steps must be >= 1"),
])
def test_override_errors_name_the_key(override, match):
    extra = ["optimizer.grad_accum_steps=4"] if "global_batch_size" in override else []
    with pytest.raises(ConfigError, match=match):
        load_train_config(None, [*extra, override])


def test_unknown_key_in_yaml_is_named_with_the_valid_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  resolutoin: 512\n")
    with pytest.raises(ConfigError, match=r"'data.resolutoin'; did you mean 'data.resolution'\?.*Valid keys "
                                          r"in section 'data': cache, crop"):
        load_train_config(path)


def test_missing_paths_are_reported_before_training():
    with pytest.raises(ConfigError, match="workdir is not set"):
        load_train_config(None).validate_for_training()


def test_recipes_exist():
    assert len(RECIPES) >= 5, RECIPES  # tiny, SD1.5 base and Plus, SDXL, TPU pod


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_recipes_load(recipe):
    config = load_train_config(recipe, ["workdir=/tmp/x", "data.source=/data/prepared"])
    config.validate_for_training()

"""`mesh: auto` / `model.remat: auto` (planning/search.py): the config words, the global batch fitted to the chip
count, activations counted from the traced backward pass, and the ranking under a memory budget. On CPU devices;
tests/planning/test_tpu_plan.py compiles the pick for a TPU slice."""

from __future__ import annotations

import dataclasses

import jax
import pytest
from planning.tpu_worker import write_base

from ipadapter_jax.errors import ConfigError
from ipadapter_jax.planning import bases, search, steps
from ipadapter_jax.training.config import load_train_config


@pytest.fixture(scope="module")
def base_root(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("base"))


def _config(root, *overrides):
    return load_train_config(None, [f"model.base={root}", f"model.image_encoder={root / 'image_encoder'}",
                                    "model.variant=base", "data.resolution=256", "total_steps=1000", *overrides])


def _search(root, config, devices, capacity):
    base = bases.base_architecture(str(root))
    encoder = bases.image_encoder_config(str(root / "image_encoder"), base)
    return search.search(config, base, encoder, devices, capacity)


def test_config_words(tmp_path, base_root):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("mesh: auto\nmodel:\n  remat: auto\n")
    config = load_train_config(recipe)
    assert config.mesh.auto and config.model.remat == "auto" and search.is_auto(config)
    assert load_train_config(None, ["mesh=auto"]).mesh.auto
    assert not search.is_auto(load_train_config(None, []))
    recipe.write_text("mesh: all\n")
    with pytest.raises(ConfigError, match="'mesh' is a section .* or the word auto, not 'all'"):
        load_train_config(recipe)


def test_global_batch_rises_to_the_chip_count_with_the_same_images(base_root):
    config = _config(base_root, "global_batch_size=32", "total_steps=100000")
    fitted, notes = search.fit_global_batch(config, 256)
    assert (fitted.global_batch_size, fitted.total_steps) == (256, 12500)
    assert "raised to 256" in notes[0] and "100000 -> 12500" in notes[0]
    assert search.fit_global_batch(config, 8) == (config, [])
    odd, _ = search.fit_global_batch(dataclasses.replace(config, total_steps=7), 24)  # 48 images, 7 steps
    assert odd.global_batch_size == 48 and odd.total_steps * 48 >= 7 * 32


def test_activations_follow_the_remat_policy_and_the_batch(base_root):
    mesh = steps.slice_mesh(jax.devices()[:1], 1, 1)
    base = bases.base_architecture(str(base_root))
    encoder = bases.image_encoder_config(str(base_root / "image_encoder"), base)
    kept = {}
    for remat in ("none", "dots_no_batch", "full"):
        for batch in (1, 2):
            program = steps.train_program(_config(base_root, f"model.remat={remat}", f"global_batch_size={batch}"),
                                          base, encoder, mesh)
            kept[remat, batch] = search.activation_bytes(*program.loss, mesh)
    for remat in ("none", "dots_no_batch", "full"):
        assert kept[remat, 2] > kept[remat, 1] > 0
    # full remat keeps only the blocks' inputs (dots_no_batch keeps every matmul output, which in a model this
    # small is nearly everything: about what no remat keeps)
    assert kept["full", 2] < 0.5 * min(kept["none", 2], kept["dots_no_batch", 2])


def test_unlimited_memory_takes_the_fastest_choice(base_root):
    config = _config(base_root, "mesh=auto", "model.remat=auto", "global_batch_size=8")
    found = _search(base_root, config, jax.devices()[:4], None)
    best = found.ranked[0]
    assert (best.fsdp, best.remat, best.batch_per_chip, best.grad_accum_steps) == (1, "none", 2, 1)
    resolved = found.resolved(best)
    assert not resolved.mesh.auto and (resolved.mesh.data, resolved.mesh.fsdp) == (4, 1)
    assert resolved.model.remat == "none" and resolved.optimizer.grad_accum_steps == 1
    assert {c.fsdp for c in found.ranked} == {1, 2, 4} and {c.remat for c in found.ranked} == set(search.REMAT_CHOICES)
    # no memory limit (CPU): nothing is traced or counted, and the choice says no size
    assert all(c.bytes is None for c in found.ranked) and "GiB" not in found.summary(best)


def test_a_memory_budget_moves_the_choice_to_what_fits(base_root):
    config = _config(base_root, "mesh=auto", "model.remat=auto", "global_batch_size=16")
    devices = jax.devices()[:4]
    everything = _search(base_root, config, devices, 2**60).ranked  # every candidate fits, each one counted
    assert len(everything) == len(_search(base_root, config, devices, None).ranked)
    fastest = everything[0]
    smallest = min(everything, key=lambda c: c.bytes)
    capacity = int((fastest.bytes + smallest.bytes) / 2 / search.USABLE)
    found = _search(base_root, config, devices, capacity)
    assert found.rejected > 0 and found.ranked
    assert all(c.bytes <= search.USABLE * capacity for c in found.ranked)
    best = found.ranked[0]
    assert best.bytes < fastest.bytes and best.speed <= fastest.speed
    assert best.speed == max(c.speed for c in everything if c.bytes <= search.USABLE * capacity)
    with pytest.raises(ConfigError, match="No split of 16 images over 4 chips fits"):
        _search(base_root, config, devices, smallest.bytes // 2)


def test_plan_compiles_the_next_candidate_when_the_compiler_refuses(base_root):
    from types import SimpleNamespace

    from ipadapter_jax.errors import UserError
    from ipadapter_jax.planning import plan

    config = _config(base_root, "mesh=auto", "model.remat=auto", "global_batch_size=8")
    found = _search(base_root, config, jax.devices()[:4], None)
    tried = []

    def plan_one(resolved, refuse=2):
        tried.append((resolved.mesh.fsdp, resolved.model.remat, resolved.optimizer.grad_accum_steps))
        if len(tried) <= refuse:
            raise plan.DoesNotFit("over HBM")
        return SimpleNamespace(notes=["compiled"])  # what first_accepted reads of a compiled plan

    estimate = plan.first_accepted(found, plan_one, "v5e-4")
    third = found.ranked[2]
    assert tried[-1] == (third.fsdp, third.remat, third.grad_accum_steps) and len(tried) == 3
    assert estimate.notes[0].startswith("mesh: auto and remat: auto chose " + third.describe())
    assert [n for n in estimate.notes if "refused the better-ranked" in n] == [
        f"the compiler refused the better-ranked {c.describe()}" for c in found.ranked[:2]]
    assert estimate.notes[-1] == "compiled"
    tried.clear()
    with pytest.raises(UserError, match="refused the 3 best-ranked choices for 8 images on v5e-4"):
        plan.first_accepted(found, lambda resolved: plan_one(resolved, refuse=99), "v5e-4")


def test_train_passes_over_the_choices_the_compiler_refused(base_root):
    """`train`'s choice after the compiler refused n of them on its devices (tests/training/test_sharded.py runs
    it): the (n+1)-th of the ranking, with the refused ones named; after three, one sentence naming them."""
    from ipadapter_jax.errors import UserError

    config = _config(base_root, "mesh=auto", "model.remat=auto", "global_batch_size=8")
    devices = jax.devices()[:4]
    ranked = _search(base_root, config, devices, None).ranked
    for refused in range(3):
        resolved, why = search.choose(config, devices, refused=refused)
        assert (resolved.mesh.fsdp, resolved.model.remat) == (ranked[refused].fsdp, ranked[refused].remat)
        assert why.count("the compiler refused the better-ranked") == refused
    with pytest.raises(UserError, match=r"^The compiler refused the 3 best-ranked choices for 8 images on 4 cpu "
                                        r"device\(s\) \(fsdp=1, remat=none, 2 per chip .*\)\. Use a bigger slice"):
        search.choose(config, devices, refused=3)


def test_resuming_where_auto_fits_the_batch_to_another_chip_count_is_refused(base_root):
    """A run started under `mesh: auto` on 4 chips raised 6 images to 8; on 2 chips the same recipe keeps 6. The
    resumed run would change its global batch (the data order and the update), so it is refused, with the fix."""
    from ipadapter_jax.config import to_dict
    from ipadapter_jax.training.loop import RECORD_FORMAT, check_resumable

    def record(config, devices):  # what train() writes beside its checkpoints
        resolved, _ = search.choose(config, devices)
        return {"format": RECORD_FORMAT, "config": to_dict(config), "resolved_config": to_dict(resolved),
                "adapter_spec": {}}

    recipe = _config(base_root, "mesh=auto", "global_batch_size=6")
    on_four = record(recipe, jax.devices()[:4])
    assert on_four["resolved_config"]["global_batch_size"] == 8
    check_resumable(on_four, record(recipe, jax.devices()[4:8]))  # as many chips, other ones: resumes
    with pytest.raises(ConfigError, match=r"global_batch_size was 8 when this workdir's run started and is 6 now; "
                                          r".*set global_batch_size=8 total_steps=750"):
        check_resumable(on_four, record(recipe, jax.devices()[:2]))
    # the fix it names resumes on 2 chips
    check_resumable(on_four, record(_config(base_root, "mesh=auto", "global_batch_size=8", "total_steps=750"),
                                    jax.devices()[:2]))

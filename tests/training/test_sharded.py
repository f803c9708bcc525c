"""Sharded training gives the single-device losses: a (2, 4) mesh (FSDP over 4, with 2 gradient-accumulation
microbatches) and an (8, 1) mesh, against a (1, 1) mesh on one device, over every step of the run."""

import jax
import numpy as np
import pytest
from training.helpers import REFERENCE_STEPS, exported_tensors, make_config, rel_diff

from ipadapter_jax.errors import ConfigError, DoesNotFit
from ipadapter_jax.planning.search import choose
from ipadapter_jax.training.loop import train

TOL = 1e-5


@pytest.mark.parametrize("mesh,extra", [((2, 4), ["optimizer.grad_accum_steps=2", "checkpoint.every_steps=1000"]),
                                        ((8, 1), ["checkpoint.every_steps=2", "checkpoint.keep=1"])],
                         ids=["data2_fsdp4_accum2", "data8_keep1"])
def test_sharded_losses_match_one_device(tiny_inputs, reference_run, initial_adapter, tmp_path, mesh, extra):
    config = make_config(tiny_inputs, tmp_path, f"mesh.data={mesh[0]}", f"mesh.fsdp={mesh[1]}", *extra)
    result = train(config, devices=jax.devices())
    assert len(result.losses) == len(reference_run.losses) == REFERENCE_STEPS
    assert sorted(int(p.name) for p in result.checkpoint_dir.iterdir() if p.name.isdigit()) == [REFERENCE_STEPS]
    assert rel_diff(result.losses, reference_run.losses) < TOL, (result.losses, reference_run.losses)
    assert rel_diff([m["grad_norm"] for m in result.history],
                    [m["grad_norm"] for m in reference_run.history]) < 1e-4
    ours, ref = exported_tensors(tmp_path), exported_tensors(reference_run.workdir)
    assert ours.keys() == ref.keys() == initial_adapter.keys()
    for name, start in initial_adapter.items():
        # Compare what training changed, as norms: Adam's step lr * m / (sqrt(v) + eps) still amplifies
        # rounding-level differences in near-zero gradient entries by up to lr / eps (see config_overrides).
        ref_update, our_update = ref[name] - start, ours[name] - start
        err = np.linalg.norm(our_update - ref_update) / np.linalg.norm(ref_update)
        assert err < 1e-3, (name, err)


def test_auto_mesh_and_remat_train_as_chosen(tiny_inputs, reference_run, tmp_path, caplog):
    """`mesh: auto` with `remat: auto` on 8 CPU devices (memory not limited): the search picks the plain data
    mesh, no remat, the whole per-chip batch at once; the run trains as that mesh does."""
    config = make_config(tiny_inputs, tmp_path, "mesh=auto", "model.remat=auto", "checkpoint.every_steps=1000")
    assert config.mesh.auto and config.model.remat == "auto"
    with pytest.raises(ConfigError, match="pass train\\(..., choose_auto=choose\\)"):
        train(config, devices=jax.devices())
    with caplog.at_level("WARNING", logger="ipadapter_jax.train"):
        result = train(config, devices=jax.devices(), choose_auto=choose)
    assert "mesh: auto and remat: auto chose fsdp=1, remat=none, 2 per chip x 1 accumulation step(s)" in caplog.text
    assert rel_diff(result.losses, reference_run.losses) < TOL, (result.losses, reference_run.losses)


# How libtpu words a step over the chip's HBM (CPU memory is not planned, so XLA:CPU never refuses one).
OUT_OF_HBM = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 21.95G "
              "of 15.48G hbm. Exceeded hbm capacity by 6.47G.\n\nTotal hbm usage >= 22.47G:")


_COMPILE = jax.stages.Lowered.compile


def _refuse_compiles(monkeypatch, first: int) -> list:
    """The first `first` explicit compiles (train's step) fail as libtpu's out-of-HBM refusal does."""
    calls = []

    def compile(self, *args, **kwargs):
        calls.append(1)
        if len(calls) <= first:
            raise RuntimeError(OUT_OF_HBM)
        return _COMPILE(self, *args, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", compile)
    return calls


def test_a_choice_the_compiler_refuses_gives_way_to_the_next(tiny_inputs, reference_run, tmp_path, caplog,
                                                             monkeypatch):
    """When the compiler refuses `mesh: auto`'s pick for the devices' memory, `train` sets up again with the
    next-ranked choice, as `plan` does, and trains as that mesh does; a mesh named in the recipe gets one sentence
    with the fix (and when every try is refused: tests/planning/test_search.py)."""
    calls = _refuse_compiles(monkeypatch, first=1)
    config = make_config(tiny_inputs, tmp_path / "auto", "mesh=auto", "model.remat=auto", "checkpoint.every_steps=1000")
    with caplog.at_level("WARNING", logger="ipadapter_jax.train"):
        result = train(config, devices=jax.devices(), choose_auto=choose)
    assert len(calls) == 2
    log = caplog.text
    assert ("The compiler refused the chosen step for the devices' memory: XLA:TPU compile permanent error. Ran out "
            "of memory in memory space hbm. Used 21.95G of 15.48G hbm. Exceeded hbm capacity by 6.47G; compiling the "
            "next-ranked choice.") in log
    # second in the ranking on 8 devices without a memory limit: as fast by the model, the weights split in two
    assert "mesh: auto and remat: auto chose fsdp=2, remat=none, 2 per chip x 1 accumulation step(s)" in log
    assert "the compiler refused the better-ranked fsdp=1, remat=none, 2 per chip x 1 accumulation step(s)" in log
    assert rel_diff(result.losses, reference_run.losses) < TOL, (result.losses, reference_run.losses)

    _refuse_compiles(monkeypatch, first=99)
    named = make_config(tiny_inputs, tmp_path / "named", "mesh.data=8", "mesh.fsdp=1")
    with pytest.raises(DoesNotFit, match=r"^The training step does not fit in the memory of the 8 cpu device\(s\): "
                                         r"XLA:TPU .* capacity by 6\.47G\. To fit: lower global_batch_size, "
                                         r".* or set mesh: auto to search for a split that fits\.$"):
        train(named, devices=jax.devices())
    assert not (tmp_path / "named" / "export").exists()

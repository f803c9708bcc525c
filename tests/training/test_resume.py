"""A run killed mid-way (SIGKILL, possibly during an async checkpoint save) and resumed from its workdir ends
with exactly the parameters of the uninterrupted run: train state, RNG and data-iterator position restored."""

import os
import signal

import jax
import numpy as np
from training.helpers import (
    REFERENCE_STEPS,
    config_overrides,
    exported_tensors,
    make_config,
    persistent_cache,
    read_log,
    run_workers,
)

from ipadapter_jax.training.loop import train

KILL_AT = 5


def test_killed_run_resumes_to_the_uninterrupted_parameters(tiny_inputs, reference_run, compilation_cache,
                                                           tmp_path):
    workdir = tmp_path / "run"
    log = tmp_path / "killed.jsonl"
    spec = {"xla_flags": os.environ["XLA_FLAGS"], "overrides": config_overrides(tiny_inputs, workdir),
            "log": str(log), "kill_at_step": KILL_AT, "one_device": True,
            "compilation_cache_dir": str(compilation_cache)}
    (killed,) = run_workers([spec], tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    before = read_log(log)
    assert [m["step"] for m in before] == list(range(1, KILL_AT + 1))
    assert not (workdir / "export").exists()  # it never finished
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved in ([2], [2, 4])  # every 2 steps; the save of step 4 may have been cut short by the kill

    with persistent_cache(compilation_cache):  # the compiled step is the reference run's
        resumed = train(make_config(tiny_inputs, workdir), devices=jax.devices()[:1])
    assert resumed.resumed_from in (2, 4)
    assert resumed.step == REFERENCE_STEPS
    # Every step's loss, before and after the kill, is the uninterrupted run's.
    np.testing.assert_array_equal([m["loss"] for m in before], reference_run.losses[:KILL_AT])
    np.testing.assert_array_equal(resumed.losses, reference_run.losses[resumed.resumed_from:])
    ours, ref = exported_tensors(workdir), exported_tensors(reference_run.workdir)
    assert ours.keys() == ref.keys()
    for name in ref:
        np.testing.assert_array_equal(ours[name], ref[name], err_msg=name)

"""Training under faults and bad settings: a clear error or a clean fallback, never a hang, a traceback, a NaN
adapter or a lost checkpoint."""

import errno
import hashlib
import os
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import pytest
from training.helpers import REFERENCE_STEPS, config_overrides, make_config, persistent_cache

from ipadapter_jax.cli import main
from ipadapter_jax.errors import CheckpointError, ConfigError
from ipadapter_jax.tiny_models import write_tiny_pipeline
from ipadapter_jax.training.loop import TrainingDiverged, train


def _copy_run(reference_run, tmp_path: Path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(reference_run.workdir, workdir)
    return workdir


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def deadline():
    """Fail instead of hanging: a fault must end the run within minutes."""
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("the run hung")))
    signal.alarm(600)
    yield
    signal.alarm(0)


def test_non_finite_settings_are_refused(tiny_inputs, tmp_path, capfd):
    for bad in ("optimizer.lr=nan", "optimizer.lr=inf", "loss.noise_offset=nan"):
        with pytest.raises(ConfigError, match="must be a finite number"):
            make_config(tiny_inputs, tmp_path, bad)
    config = tmp_path / "c.yaml"
    config.write_text("optimizer:\n  lr: .nan\n")
    assert main(["train", "--config", str(config), f"workdir={tmp_path / 'w'}"]) == 2
    err = capfd.readouterr().err
    assert "optimizer.lr' must be a finite number" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_a_diverging_resumed_run_saves_and_exports_nothing(tiny_inputs, reference_run, tmp_path, deadline):
    workdir = _copy_run(reference_run, tmp_path)
    before = _hashes(workdir / "export") | {f"ckpt/{k}": v for k, v in _hashes(workdir / "checkpoints").items()}
    with pytest.raises(TrainingDiverged, match=r"Training diverged at step \d+: the loss is (nan|inf).*Lower "
                                               r"optimizer\.lr"):
        train(make_config(tiny_inputs, workdir, f"total_steps={REFERENCE_STEPS + 2}", "optimizer.lr=1e30"),
              devices=jax.devices()[:1])
    after = _hashes(workdir / "export") | {f"ckpt/{k}": v for k, v in _hashes(workdir / "checkpoints").items()}
    assert after == before  # the good export and checkpoints are untouched; nothing new was saved


def test_resuming_with_other_base_weights_is_refused(tiny_inputs, reference_run, tmp_path):
    workdir = _copy_run(reference_run, tmp_path)
    other = write_tiny_pipeline(tmp_path / "other_base", seed=1)  # same shapes, other weights
    with pytest.raises(ConfigError, match=r"model\.base .* holds other weights than when this workdir's run"):
        train(make_config(tiny_inputs, workdir, f"model.base={other}"), devices=jax.devices()[:1])


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tiny_inputs, reference_run, compilation_cache,
                                                                   tmp_path, deadline, capfd):
    workdir = _copy_run(reference_run, tmp_path)
    for f in (workdir / "checkpoints" / str(REFERENCE_STEPS) / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"")
    shutil.rmtree(workdir / "export")
    with persistent_cache(compilation_cache):  # the compiled step is the reference run's
        resumed = train(make_config(tiny_inputs, workdir, "monitor.progress_bar=false"), devices=jax.devices()[:1])
    out = capfd.readouterr()
    assert f"checkpoints/{REFERENCE_STEPS} cannot be read" in out.out + out.err and "Traceback" not in out.err
    assert resumed.resumed_from == REFERENCE_STEPS - 2 and resumed.step == REFERENCE_STEPS
    np.testing.assert_array_equal(resumed.losses, reference_run.losses[REFERENCE_STEPS - 2:])
    aside = [p.name for p in (workdir / "checkpoints").iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and aside[0].startswith(f"{REFERENCE_STEPS}.")  # kept, not deleted


def test_an_unwritable_checkpoint_folder_stops_the_run_with_one_sentence(tiny_inputs, compilation_cache, tmp_path,
                                                                         monkeypatch, deadline):
    """The folder turns read-only after step 3 (simulated: we may run as root, whom permissions do not stop)."""
    workdir = tmp_path / "run"
    checkpoints = str(workdir / "checkpoints")
    real_mkdir, armed = os.mkdir, []

    def mkdir(path, *args, **kwargs):
        if armed and os.fspath(path).startswith(checkpoints):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    with persistent_cache(compilation_cache), pytest.raises(
            CheckpointError, match=r"Cannot write checkpoints to .*checkpoints \(PermissionError: .*Permission denied"
                                   r".*then rerun the same command to resume"):
        train(make_config(tiny_inputs, workdir), devices=jax.devices()[:1],
              on_step=lambda step, _: armed.append(step) if step == 3 else None)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]


def test_a_full_disk_at_export_is_one_line(tiny_inputs, tmp_path, monkeypatch, capfd):
    from ipadapter_jax.weights import ip_adapter_files

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "export"))

    monkeypatch.setattr(ip_adapter_files, "save_safetensors", full)
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    overrides = config_overrides(tiny_inputs, tmp_path / "run", "total_steps=0", "mesh.data=-1")
    assert main(["train", "--config", str(config), *overrides]) == 2
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in err

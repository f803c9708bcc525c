"""Exports: the official-layout .safetensors written at the end of a run and on demand from any checkpoint load
back as the trained adapter; a run can start from an exported adapter."""

import jax
import numpy as np
from training.helpers import exported_tensors, make_config

from ipadapter_jax.checkpoint import Checkpointer
from ipadapter_jax.training.loop import export_checkpoint, train
from ipadapter_jax.training.model import _adapter_name
from ipadapter_jax.weights.ip_adapter_files import load_ip_adapter
from ipadapter_jax.weights.safetensors_io import SafetensorsFile


def test_final_export_loads_back(reference_run, tiny_inputs, initial_adapter):
    official = reference_run.exported
    assert official.name == "ip_adapter.safetensors" and official.is_file()
    keys = set(SafetensorsFile(official))
    assert "image_proj.proj.weight" in keys and "ip_adapter.1.to_k_ip.weight" in keys
    adapter = load_ip_adapter(official, unet_config=tiny_inputs["base"] / "unet")
    ours = exported_tensors(reference_run.workdir)
    loaded = adapter.tensors()
    assert loaded.keys() == ours.keys()
    for name in ours:
        np.testing.assert_array_equal(loaded[name], ours[name], err_msg=name)
    assert any(not np.array_equal(ours[k], initial_adapter[k]) for k in ours)  # it is the trained one


def test_export_on_demand_from_a_checkpoint(reference_run, tiny_inputs, tmp_path):
    out = export_checkpoint(reference_run.workdir, tmp_path / "step4.safetensors", step=4)
    adapter = load_ip_adapter(out, unet_config=tiny_inputs["base"] / "unet")
    checkpointer = Checkpointer(reference_run.checkpoint_dir, every_steps=1, keep=0)
    params = checkpointer.restore_state_locally(4)["params"]
    checkpointer.close()
    tensors = adapter.tensors()
    for key, value in params.items():
        np.testing.assert_array_equal(tensors[_adapter_name(key)], np.asarray(value), err_msg=key)


def test_training_can_start_from_an_exported_adapter(reference_run, tiny_inputs, tmp_path):
    config = make_config(tiny_inputs, tmp_path, "total_steps=0", f"model.init_adapter={reference_run.exported}")
    train(config, devices=jax.devices()[:1])
    start, ref = exported_tensors(tmp_path), exported_tensors(reference_run.workdir)
    for name in ref:
        np.testing.assert_array_equal(start[name], ref[name], err_msg=name)


def test_export_from_the_command_line(reference_run, tmp_path, capsys):
    from ipadapter_jax.cli import main

    out = tmp_path / "cli.safetensors"
    assert main(["convert", "from-checkpoint", str(reference_run.workdir), "--out", str(out), "--step", "4"]) == 0
    assert set(SafetensorsFile(out)) == set(SafetensorsFile(export_checkpoint(reference_run.workdir, step=4)))
    again = ["convert", "from-checkpoint", str(reference_run.workdir), "--out", str(out)]
    assert main(again) == 2  # an existing file is kept ...
    assert str(out) in capsys.readouterr().err
    assert main([*again, "--overwrite"]) == 0  # ... unless asked
    assert main(["convert", "from-checkpoint", str(reference_run.workdir), "--step", "3"]) == 2
    assert "no checkpoint for step 3 (available:" in capsys.readouterr().err
    assert main(["convert", "from-checkpoint", str(tmp_path / "not-a-run")]) == 2
    assert "does not exist; point to a training workdir" in capsys.readouterr().err

"""Two processes on this machine (jax.distributed on localhost, Gloo CPU collectives, 4 CPU devices each)
training over one (2, 4) mesh spanning both give the single-process, single-device losses."""

import os
import socket
import subprocess
import sys

import numpy as np
from training.helpers import REFERENCE_STEPS, config_overrides, read_log, rel_diff, run_workers

from ipadapter_jax.weights.safetensors_io import SafetensorsFile


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_single_process_losses(tiny_inputs, reference_run, tmp_path):
    port = _free_port()
    specs = []
    for pid in range(2):
        overrides = config_overrides(
            tiny_inputs, tmp_path / "run", "mesh.data=2", "mesh.fsdp=4", "distributed.enabled=true",
            "checkpoint.every_steps=1000",  # the final checkpoint only: fewer cross-process barriers
            f"distributed.coordinator_address=localhost:{port}", "distributed.num_processes=2",
            f"distributed.process_id={pid}")
        specs.append({"xla_flags": "--xla_force_host_platform_device_count=4", "overrides": overrides,
                      "log": str(tmp_path / f"process_{pid}.jsonl")})
    results = run_workers(specs, tmp_path)
    for r in results:
        assert r.returncode == 0, r.stdout[-4000:]
    logs = [read_log(tmp_path / f"process_{pid}.jsonl") for pid in range(2)]
    for log in logs:
        assert [m["step"] for m in log] == list(range(1, REFERENCE_STEPS + 1))
        assert rel_diff([m["loss"] for m in log], reference_run.losses) < 1e-5
    assert (tmp_path / "run" / "export" / "ip_adapter.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoints" / str(REFERENCE_STEPS)).is_dir()
    # The checkpoint was saved over 8 devices in 2 processes; exporting it needs neither: one device will do.
    out = tmp_path / "one_device.safetensors"
    cmd = [sys.executable, "-m", "ipadapter_jax.cli", "convert", "from-checkpoint", str(tmp_path / "run"),
           "--out", str(out)]
    proc = subprocess.run(cmd, env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    final = SafetensorsFile(tmp_path / "run" / "export" / "ip_adapter.safetensors")
    exported = SafetensorsFile(out)
    assert set(exported) == set(final)
    for key in final:
        np.testing.assert_array_equal(exported[key], final[key], err_msg=key)

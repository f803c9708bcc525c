"""Helpers shared by the training tests."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from ipadapter_jax.training.config import load_train_config
from ipadapter_jax.weights.safetensors_io import SafetensorsFile

REFERENCE_STEPS = 6
WORKER = Path(__file__).with_name("train_worker.py")


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def exported_tensors(workdir) -> dict[str, np.ndarray]:
    """The final adapter a run exported, in our Flax folder (exact float32 values)."""
    f = SafetensorsFile(workdir / "export" / "ip_adapter" / "ip_adapter.safetensors")
    return {k: np.asarray(f[k]) for k in f}


def config_overrides(inputs: dict[str, Path], workdir: Path, *overrides: str) -> list[str]:
    """A small, fast run: 32 px images (8x8 latents), batch 16, 6 steps, checkpoints every 2 steps.

    Adam's eps is 1e-6 rather than 1e-8: its first update lr * g / (|g| + eps) has slope lr / eps in g, and a
    gradient entry that cancels to ~1e-8 carries absolute rounding of ~1e-9 that depends on the reduction order
    (mesh, accumulation). With eps = 1e-8 that moved one entry by 0.15 lr between meshes on an AMD CPU; with
    1e-6 the amplification is 100x smaller while typical entries (|g| ~ 3e-3) still dominate eps."""
    return [
        f"workdir={workdir}", f"model.base={inputs['base']}", f"model.image_encoder={inputs['encoder']}",
        f"data.source={inputs['data']}", "data.resolution=32", "data.read_threads=2", "global_batch_size=16",
        f"total_steps={REFERENCE_STEPS}", "seed=7", "optimizer.lr=1e-3", "optimizer.eps=1e-6",
        "checkpoint.every_steps=2", "checkpoint.keep=10", "monitor.progress_bar=false", "monitor.tensorboard=false",
        "monitor.log_every_steps=1000", "mesh.data=1", "mesh.fsdp=1", *overrides,
    ]


def make_config(inputs: dict[str, Path], workdir: Path, *overrides: str):
    return load_train_config(None, config_overrides(inputs, workdir, *overrides))


def run_workers(specs: list[dict], tmp_path: Path, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Run ``train_worker.py`` once per spec, all at the same time; their outputs as completed processes."""
    procs = []
    for i, spec in enumerate(specs):
        spec_file = tmp_path / f"worker_{i}.json"
        spec_file.write_text(json.dumps(spec))
        env = {**os.environ, "XLA_FLAGS": spec["xla_flags"]}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(spec_file)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    out = []
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, None))
    return out


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def persistent_cache(path: Path):
    """JAX's persistent compilation cache in ``path`` for the duration (every compile is cached)."""
    names = {"jax_compilation_cache_dir": str(path), "jax_persistent_cache_min_compile_time_secs": 0.0,
             "jax_persistent_cache_min_entry_size_bytes": 0}
    before = {name: getattr(jax.config, name) for name in names}
    for name, value in names.items():
        jax.config.update(name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            jax.config.update(name, value)

"""``python train_worker.py spec.json``: one training run in its own process (kill/resume, two-process tests).

spec: {"xla_flags", "overrides": [...], "log": path (one JSON line of metrics per step),
       "kill_at_step": int | null (SIGKILL itself right after that step), "one_device": bool,
       "compilation_cache_dir": path | null (share compiled steps with the test session)}
The test session's numerics (strict promotion, highest matmul precision) are set as in tests/conftest.py.
"""

import json
import os
import signal
import sys

spec = json.loads(open(sys.argv[1]).read())
os.environ["XLA_FLAGS"] = spec["xla_flags"]
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")
if spec.get("compilation_cache_dir"):
    jax.config.update("jax_compilation_cache_dir", spec["compilation_cache_dir"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from ipadapter_jax.training.config import load_train_config  # noqa: E402
from ipadapter_jax.training.loop import train  # noqa: E402


def on_step(step: int, metrics: dict) -> None:
    with open(spec["log"], "a") as f:
        f.write(json.dumps({**metrics, "step": step}) + "\n")
    if step == spec.get("kill_at_step"):
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final checkpoint: a crash


if __name__ == "__main__":
    config = load_train_config(None, spec["overrides"])
    train(config, devices=jax.devices()[:1] if spec.get("one_device") else None, on_step=on_step)

"""Test session setup: 8 fake CPU devices, strict dtype promotion, float32 everywhere, no network."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite compiles ~2,900 programs, nearly all for tiny models, and spent more than half its time in XLA:CPU's
# compiler, mostly in LLVM (1,118 of 1,967 worker-seconds). JAX's switch for "optimising costs more than running"
# keeps each program and XLA's HLO passes and drops LLVM's optimisation of the generated loops: compilation
# 587 s, the suite 1,340 worker-seconds (2-core AMD EPYC). Set before JAX starts, so that the subprocesses the tests
# spawn (training workers) compile the same way; tests whose run time dominates ask for optimised code with
# `@pytest.mark.optimized_code`. JAX_DISABLE_MOST_OPTIMIZATIONS=0 compiles the whole suite as users' programs are.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# The CLI keeps compiled programs and converted weights in the user's cache folder; tests that want them turn
# them on in a temporary one.
os.environ["IPADAPTER_JAX_COMPILE_CACHE"] = "0"
os.environ["IPADAPTER_JAX_WEIGHTS_CACHE"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402
from clip_fixture import clip_folder  # noqa: E402, F401 (a fixture of the evaluation and training tests)

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")
# Start the backends now: the in-process CLI calls of the tests then find the set-up above in every worker alike
# (xla_flags.configure_xla_for_cpu reports "too late"), whichever test a worker runs first; the CLI subprocesses
# the tests spawn set themselves up as users' commands do.
jax.devices()

# The longest test files (`pytest --durations=0`, summed per file, 2-core AMD EPYC), longest first. The workers
# take whole files in collection order (`--dist loadfile --no-loadscope-reorder`), so these start first and the
# workers finish together; by default xdist queues files with the most tests first, and the 3-minute world
# learning test, two tests in one file, started last and ran alone at the end.
LONGEST_FILES = ("tests/world/test_learning.py", "tests/planning/test_tpu_plan.py",
                 "tests/training/test_two_process.py", "tests/training/test_sharded.py",
                 "tests/models/test_ip_controls.py", "tests/pipelines/test_image_prompt_controls.py",
                 "tests/models/test_unet.py", "tests/pipelines/test_pipeline_parity.py",
                 "tests/training/test_torch_parity.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable: the rest as collected


def pytest_configure(config):
    config.addinivalue_line("markers", "optimized_code: compile this test's programs with XLA's full optimisation "
                                       "(for tests whose run time, not compile time, dominates)")


@pytest.fixture(autouse=True)
def _optimized_code(request):
    if request.node.get_closest_marker("optimized_code") is None:
        yield
        return
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="session")
def torch():
    """PyTorch on CPU, single-threaded-deterministic enough for parity checks."""
    import torch as _torch

    _torch.manual_seed(0)
    return _torch

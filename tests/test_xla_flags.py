"""xla_flags.configure_xla_for_cpu: the CLI's and benchmarks' XLA:CPU set-up takes effect whenever JAX has not yet
started its backends, even if jax, flax and this library are already imported (bench/generate.py imports
the library at module level; its timed side once ran without the flags because an import alone counted as too
late), and says so when it is too late. The benchmarks refuse to time a process it could not set up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ipadapter_jax.xla_flags import CPU_FLAGS, _has_accelerator

ROOT = Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, sys.argv[1])  # bench/
    import generate  # imports jax, flax and the library at module level, as a timed side does
    import jax
    from _common import configure_xla_for_cpu as bench_configure
    from ipadapter_jax.xla_flags import configure_xla_for_cpu

    first = configure_xla_for_cpu()
    flags = os.environ.get("XLA_FLAGS", "")
    jax.devices()  # backends start: XLA has read its flags and started its threads
    late = configure_xla_for_cpu()
    try:
        bench_configure()
        refused = None
    except SystemExit as e:
        refused = str(e)
    print(json.dumps({"first": first, "flags": flags, "late": late, "refused": refused}))
""")


def _child(**env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "IPADAPTER_JAX_CPU_FLAGS")}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT / "bench")], capture_output=True, text=True,
                         check=True, env={**environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_has_accelerator(), reason="the CPU flags are for hosts without an accelerator")
def test_flags_apply_after_imports_and_refuse_once_backends_started():
    result = _child()
    assert result["first"] == "applied", result
    assert all(flag in result["flags"].split() for flag in CPU_FLAGS), result
    assert result["late"] == "too late", result
    assert result["refused"] and "configure_xla_for_cpu" in result["refused"], result


def test_opt_out_is_reported_and_leaves_the_flags_alone():
    result = _child(IPADAPTER_JAX_CPU_FLAGS="0")
    assert result["first"] == result["late"] == "opted out", result
    assert result["flags"] == "", result
    assert result["refused"] is None, result  # a user's choice, not a mistake of the benchmark


def test_a_jax_that_cannot_say_counts_as_started(monkeypatch):
    from jax._src import xla_bridge

    from ipadapter_jax import xla_flags

    monkeypatch.delattr(xla_bridge, "backends_are_initialized")
    assert xla_flags.backends_started() is True
    monkeypatch.delenv("IPADAPTER_JAX_CPU_FLAGS", raising=False)
    monkeypatch.setattr(xla_flags, "_has_accelerator", lambda: False)
    monkeypatch.setattr("ipadapter_jax.host_memory.share_one_arena", lambda: pytest.fail("must not change malloc"))
    before = os.environ.get("XLA_FLAGS")
    assert xla_flags.configure_xla_for_cpu() == "too late"
    assert os.environ.get("XLA_FLAGS") == before

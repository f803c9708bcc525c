"""host_memory: with one shared arena and freed memory retained, a big block freed by a worker thread is reused by
the next one with no fresh page faults (as XLA:CPU's per-step temporary buffer is); without, glibc maps fresh
pages every time. Retaining needs the shared arena (a process this project owns) and room for two copies."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

_CHILD = textwrap.dedent("""
    import ctypes, json, resource, sys, threading
    import numpy  # imported first, as in the CLI: its threads start before ours is called
    from ipadapter_jax.host_memory import retain_freed_memory, share_one_arena

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)

    size = 256 * 2**20  # 256 MiB through plain malloc (numpy would ask the kernel for huge pages)
    applied = share_one_arena() and retain_freed_memory(size) if sys.argv[1] == "retain" else False
    faults = []

    def one_run():  # what an XLA run does on its worker thread: allocate, write, free
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    for _ in range(3):
        t = threading.Thread(target=one_run)
        t.start()
        t.join()
    print(json.dumps({"applied": applied, "faults": faults}))
""")


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_without_new_page_faults():
    pages = 256 * 2**20 // 4096  # 65,536 pages of 4 KiB
    default, retained = _faults("default"), _faults("retain")
    if not retained["applied"]:
        pytest.skip("not glibc: mallopt cannot keep freed memory here")
    assert max(retained["faults"][1:]) < pages // 50, retained  # the first run's pages serve the later ones
    # By default every run maps fresh pages (65,537 faults of 4 KiB; about 129 where the kernel hands out huge
    # pages unasked, transparent_hugepage=always), the retained runs none.
    assert min(default["faults"][1:]) > max(retained["faults"][1:]), (default, retained)


def test_retains_only_in_an_owned_process_with_room(monkeypatch):
    from ipadapter_jax import host_memory

    monkeypatch.setattr(host_memory, "_arena_shared", False)  # a library user's process: never touched
    monkeypatch.setattr(host_memory, "_mallopt", lambda: pytest.fail("must not change the allocator"))
    assert host_memory.retain_freed_memory(2**20) is False
    monkeypatch.setattr(host_memory, "_arena_shared", True)
    monkeypatch.setattr(host_memory, "available_bytes", lambda: 8 * 2**30)
    assert host_memory.retain_freed_memory(4 * 2**30) is False  # 2 x 4 GiB + 1 GiB margin > 8 GiB


def test_opt_out(monkeypatch):
    from ipadapter_jax import host_memory

    monkeypatch.setenv("IPADAPTER_JAX_RETAIN_MEMORY", "0")
    assert host_memory._mallopt() is None
    assert host_memory.share_one_arena() is False

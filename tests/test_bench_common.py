"""bench/_common.host_cpu: every benchmark header names the CPU generation, since torch/XLA ratios differ between
AMD EPYC generations that /proc/cpuinfo names alike ("AMD EPYC")."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from _common import host_cpu  # noqa: E402


def _cpuinfo(vendor: str, name: str, family: int, model: int, flags: str) -> str:
    block = (f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
             f"model name\t: {name}\nflags\t\t: fpu sse2 {flags}\n")
    return block + "\n" + block.replace("processor\t: 0", "processor\t: 1")


def test_amd_generations_are_told_apart_by_family_and_model():
    zen5 = _cpuinfo("AuthenticAMD", "AMD EPYC", 26, 2, "avx2 avx512f avx512_bf16")
    zen4 = _cpuinfo("AuthenticAMD", "AMD EPYC", 25, 17, "avx2 avx512f avx512_bf16")
    zen3 = _cpuinfo("AuthenticAMD", "AMD EPYC 7B13", 25, 1, "avx2")
    cpus = f"{os.cpu_count()} CPUs"
    assert host_cpu(zen5) == f"AMD EPYC (Zen 5: family 26, model 2), {cpus}, AVX-512 with BF16"
    assert host_cpu(zen4) == f"AMD EPYC (Zen 4: family 25, model 17), {cpus}, AVX-512 with BF16"
    assert host_cpu(zen3) == f"AMD EPYC 7B13 (Zen 3: family 25, model 1), {cpus}, AVX2"


def test_intel_keeps_its_model_name_and_reports_amx():
    name = "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    text = _cpuinfo("GenuineIntel", name, 6, 143, "avx2 avx512f avx512_bf16 amx_bf16 amx_tile")
    assert host_cpu(text) == f"{name} (family 6, model 143), {os.cpu_count()} CPUs, AVX-512 with BF16 and AMX"


def test_this_host_is_described():
    assert f"{os.cpu_count()} CPUs" in host_cpu()

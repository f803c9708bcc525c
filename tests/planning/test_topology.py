"""Slice names, chip facts, and what `plan` says where libtpu is missing (the CPU test environment)."""

from __future__ import annotations

import pytest

from ipadapter_jax.cli import main
from ipadapter_jax.errors import UserError
from ipadapter_jax.planning import parse_topology
from ipadapter_jax.planning.report import kernel_costs


@pytest.mark.parametrize(("name", "raw", "chips"), [
    ("v5p-8", "v5p:2x2x1", 4),  # v5p counts TensorCores, two per chip
    ("v5p-128", "v5p:4x4x4", 64),
    ("v5e-256", "v5e:16x16", 256),  # v5e and v6e count chips
    ("v6e-8", "v6e:2x4", 8),
    ("v5p:4x4x4", "v5p:4x4x4", 64),
    ("V5E:2x2", "v5e:2x2", 4),
])
def test_names_map_to_slices(name, raw, chips):
    t = parse_topology(name)
    assert (t.name, t.chips_per_slice) == (raw, chips)
    assert parse_topology(t.accelerator_type).name == raw


def test_slices_multiply_chips_and_chip_facts():
    t = parse_topology("v5e-256", num_slices=2)
    assert t.num_chips == 512
    assert t.chip.hbm_bytes == 16 * 2**30 and t.chip.peak_bf16_flops == 197e12
    assert parse_topology("v5p-8").chip.hbm_bytes == 95 * 2**30


@pytest.mark.parametrize("name", ["v5p-6", "v7x-8", "tpu", "v5e:2x2x2", "v5e-3"])
def test_unknown_names_list_the_valid_ones(name):
    with pytest.raises(UserError, match=r"not known; valid: .*v5e-\{1,4,8,.*v5p-\{8,16,"):
        parse_topology(name)


def test_plan_without_libtpu_names_the_install_command(capsys):
    assert main(["plan", "--job", "generate", "--topology", "v5e-8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install -e ".[tpu]"' in err


def test_kernel_costs_are_read_from_multiline_custom_calls():
    text = ('  %a = f32[8]{0} add(%x, %y)\n'
            '  %ipadapter_flash_fwd.3 = (bf16[4,8]{1,0}) custom-call(%p), custom_call_target="tpu_custom_call", '
            'frontend_attributes={kernel_metadata={\n"useful_flops":"10"\n}}, backend_config={"custom_call_config":'
            '{"cost_estimate":{"flops":"80","transcendentals":"3","bytes_accessed":"64"}}}\n'
            '  ROOT %ipadapter_flash_fwd.4 = (bf16[4,8]{1,0}) custom-call(%q), backend_config={"cost_estimate":'
            '{"flops":"80","transcendentals":"3","bytes_accessed":"64"}}, frontend_attributes={kernel_metadata={\n'
            '"useful_flops":"10"\n}}\n')
    costs = kernel_costs(text)
    assert list(costs) == ["ipadapter_flash_fwd"]
    k = costs["ipadapter_flash_fwd"]
    assert (k.calls, k.flops, k.useful_flops, k.bytes) == (2, 160, 20, 128)

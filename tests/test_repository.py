"""House rules that CI must keep true: the README's commands are what CI runs, and the code is lint-clean."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = next(c for c in _readme_commands() if "pytest" in c)
    assert test_command in ci


def test_readme_main_command_is_the_demo():
    assert _readme_commands()[0] == "pip install -e '.[data]' && ipadapter-jax demo --out demo-out"


def test_every_cli_subcommand_in_the_readme_exists():
    from ipadapter_jax.cli import COMMANDS

    used = set(re.findall(r"ipadapter-jax ([a-z-]+)", (ROOT / "README.md").read_text()))
    assert used and used <= set(COMMANDS)


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff is installed with the test extra")
def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    result = subprocess.run([ruff, "check", "ipadapter_jax", "tests", "bench"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-3000:]

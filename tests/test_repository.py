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


# --- the import picture (README "Architecture") ---------------------------------------------------------------

PACKAGE = ROOT / "ipadapter_jax"


def _unit(module: str) -> str:
    """The floor a module belongs to: its subpackage (`models`, `weights`, ...) or its own name at top level."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _import_graph() -> dict[str, set[str]]:
    """unit -> units it imports (every import statement, function-local ones included)."""
    import ast

    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        unit = _unit(module)
        targets = graph.setdefault(unit, set())
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("ipadapter_jax.") and (PACKAGE.joinpath(*name.split(".")[1:]).exists()
                                                          or PACKAGE.joinpath(*name.split(".")[1:]).with_suffix(
                                                              ".py").exists()):
                    target = _unit(name)
                    if target != unit:
                        targets.add(target)
    return graph


def test_models_are_a_leaf_and_training_does_not_import_pipelines():
    graph = _import_graph()
    assert graph["models"] <= {"errors"}, graph["models"]
    assert "pipelines" not in graph["training"], "training/ must not import pipelines/ (use generation/)"
    assert not graph["generation"] & {"pipelines", "training"}
    assert not graph["weights"] & {"pipelines", "training", "generation", "data"}


def test_no_import_loop_between_folders():
    graph = _import_graph()
    done: set[str] = set()

    def visit(unit: str, stack: list[str]) -> None:
        if unit in stack:
            raise AssertionError("import loop: " + " -> ".join([*stack[stack.index(unit):], unit]))
        if unit in done:
            return
        for target in sorted(graph.get(unit, ())):
            visit(target, [*stack, unit])
        done.add(unit)

    for unit in sorted(graph):
        visit(unit, [])

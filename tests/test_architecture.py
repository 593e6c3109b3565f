"""The import rules of docs/architecture.md, checked on every module (function-level imports too)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BELOW = {"jobs", "infra", "schemas", "gradient_kernels"}  # what every package above the stages may import
ALLOWED = {
    "schemas": {"schemas"},
    "gradient_kernels": {"gradient_kernels"},
    "infra": {"infra", "schemas"},
    "jobs": BELOW,
    "evaluation": BELOW | {"evaluation"},
    "explorer": BELOW | {"explorer", "evaluation"},
    "demo": BELOW | {"demo", "evaluation"},
    "dags": {"dags", "jobs", "infra", "schemas", "evaluation"},
}
PROJECT = set(ALLOWED) | {"bench", "tests"}


def project_imports(path: Path) -> set[tuple[int, str]]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in PROJECT}
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_downward(package):
    broken = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, name in sorted(project_imports(path))
        if name not in ALLOWED[package]
    ]
    assert not broken, "imports against docs/architecture.md:\n" + "\n".join(broken)


def test_the_rule_catches_an_upward_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from jobs import score\n")
    assert project_imports(module) == {(2, "jobs")}


def test_every_project_package_has_a_rule():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert packages == set(ALLOWED)


def test_the_one_cli_reaches_every_command_module():
    """`python -m jobs <command>` names modules of every package by string: each must exist."""
    from importlib.util import find_spec

    from jobs.__main__ import COMMANDS

    assert {module.split(".")[0] for module, _ in COMMANDS.values()} == {"jobs", "demo", "evaluation", "explorer"}
    assert [module for module, _ in COMMANDS.values() if find_spec(module) is None] == []

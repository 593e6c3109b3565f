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


# ------------------------------------------------------------------ stages and their libraries
# jobs/ holds two kinds of module: stages (a command each, `jobs/__main__.py`) and the libraries
# they share. A stage imports libraries, never another stage: what two stages need lives below them.
JOB_LIBRARIES = {
    "autocorrelation",
    "c4_batches",
    "c4_lines",
    "catalog",
    "checkpoints",
    "corrections",
    "launch",
    "progress",
    "second_moments",
    "spectra_plot",
    "takedown_plans",
    "threads",
    "trackstar_index",
}
# (stage, stage it may import): the reason, one line each
STAGE_EXCEPTIONS = {
    ("extract_rank", "extract"): "the ranks of extract read the plan its driver wrote (ExtractConfig)",
    ("takedown", "fit_hessian"): "a takedown refits the Hessians whose sums it corrected, in its one audited run",
    ("takedown", "score"): "a takedown rescores what the removed documents ranked in, in its one audited run",
}


def job_imports(path: Path) -> set[tuple[int, str]]:
    """(line, module of jobs/) of every `from jobs import x`, `from jobs.x import`, `import jobs.x`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "jobs":
            found |= {(node.lineno, alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("jobs."):
            found.add((node.lineno, node.module.split(".")[1]))
        elif isinstance(node, ast.Import):
            found |= {(node.lineno, a.name.split(".")[1]) for a in node.names if a.name.startswith("jobs.")}
    return found


def test_a_stage_never_imports_another_stage():
    stages = {p.stem for p in (ROOT / "jobs").glob("*.py")} - JOB_LIBRARIES - {"__init__", "__main__"}
    broken = [
        f"jobs/{stage}.py:{line} imports the stage {name}"
        for stage in sorted(stages)
        for line, name in sorted(job_imports(ROOT / "jobs" / f"{stage}.py"))
        if name in stages and name != stage and (stage, name) not in STAGE_EXCEPTIONS
    ]
    assert not broken, "stage to stage imports (docs/architecture.md):\n" + "\n".join(broken)


def test_the_stage_rule_catches_each_form_of_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from jobs import score\nfrom jobs.index import run\nimport jobs.extract\n")
    assert job_imports(module) == {(1, "score"), (2, "index"), (3, "extract")}


# ------------------------------------------------------------------ sizes a newcomer reads in one sitting
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60
SIZED = ("jobs", "evaluation", "explorer", "infra")  # packages whose files stay under MAX_FILE_LINES
# what is still larger, with the reason; the list only shrinks
LARGE_FILES: dict[str, str] = {}
LONG_FUNCTIONS: dict[str, str] = {}


def function_sizes() -> dict[str, int]:
    sizes = {}
    for package in ALLOWED:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    sizes[f"{path.relative_to(ROOT)}:{node.name}"] = node.end_lineno - node.lineno + 1
    return sizes


def test_files_and_functions_stay_small_enough_to_read_in_one_sitting():
    large = {
        str(path.relative_to(ROOT))
        for package in SIZED
        for path in (ROOT / package).rglob("*.py")
        if len(path.read_text(encoding="utf-8").splitlines()) > MAX_FILE_LINES
    }
    long = {name for name, lines in function_sizes().items() if lines > MAX_FUNCTION_LINES}
    assert large - set(LARGE_FILES) == set(), f"files over {MAX_FILE_LINES} lines"
    assert long - set(LONG_FUNCTIONS) == set(), f"functions over {MAX_FUNCTION_LINES} lines"
    # an entry that no longer needs its place leaves the list
    assert set(LARGE_FILES) - large == set() and set(LONG_FUNCTIONS) - long == set()

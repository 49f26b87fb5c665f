"""The structure the code promises (docs/architecture.md): six floors whose imports only point down, stage
paths that come from dvc.yaml rather than string literals, code that never changes directory, and stage
processes that load the model stack only when a stage really runs."""
from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest
from conftest import REPO

FLOORS = ["ar_models", "proxytune", "orchestration", "testbed", "tasks", "flows"]  # bottom to top


def _imports(path) -> list[str]:
    modules = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.append(node.module)
    return modules


@pytest.mark.parametrize("floor", FLOORS)
def test_every_import_points_down(floor):
    above = set(FLOORS[FLOORS.index(floor) + 1:])
    upward = [f"{path.relative_to(REPO)} imports {module}" for path in sorted((REPO / floor).rglob("*.py"))
              for module in _imports(path) if module.split(".")[0] in above]
    assert not upward, "\n".join(upward)


def _code_files():
    return [p for floor in [*FLOORS, "bench"] for p in sorted((REPO / floor).rglob("*.py"))]


def test_stage_data_paths_are_not_written_into_the_code():
    """dvc.yaml lays the data out; only the user-facing entry points' CLI defaults name a folder there."""
    entry_points = {"flows/benchmark.py", "orchestration/compare.py"}
    literal = re.compile(r"""["']outputs/""")
    found = [f"{p.relative_to(REPO)}:{i}" for p in _code_files() if str(p.relative_to(REPO)) not in entry_points
             for i, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert not found, found


def test_nothing_changes_directory_or_links_a_project_copy():
    pattern = re.compile(r"\bchdir\(|symlink_to\(")
    found = [f"{p.relative_to(REPO)}:{i}" for p in [*_code_files(), *sorted((REPO / "tests").glob("*.py"))]
             if p.name != "test_architecture.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == ["tests/test_dvc.py:" + str(_dvc_venv_line())], found


def _dvc_venv_line() -> int:
    """The one allowed link: the DVC test's clone gets the suite's own venv as its `.venv`, as `make demo` makes."""
    lines = (REPO / "tests/test_dvc.py").read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if ".venv" in line and "symlink_to(" in line)


def test_a_stage_process_loads_no_model_library_before_it_knows_it_must_run():
    """Every `dvc repro` stage is its own process: a cached one must not pay for torch, diffusers and the rest."""
    heavy = ["torch", "diffusers", "transformers", "open_clip", "mlflow", "peft", "accelerate"]
    probe = f"import sys, flows.pipeline; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=True, capture_output=True,
                            text=True).stdout.split()
    assert not loaded, f"importing flows.pipeline loads {loaded}"

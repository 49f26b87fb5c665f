"""Shared fixtures: a throw-away project folder with the embedded tiny default built once per session."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Isolated Prefect records for the test session; set before anything imports prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="proxytune-prefect-")
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"  # keeps test output readable; no late writes at exit

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

# The models are tiny: one intra-op thread is as fast, never spin-waits when the 2 cores are busy, and keeps
# float reductions in one order for the whole session (exact-regeneration tests compare pixels).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
PROJECT_FILES = ["params.yaml", "dvc.yaml", ".dvcignore", "tasks", "proxytune", "ar_models", "testbed", "flows", "models/world"]

# Small but real settings: every stage trains/samples a few steps so the suite stays fast.
FAST = {
    "supervisor": {"steps": 4, "num_class_images": 2, "sample_steps": 2},
    "synthesize": {"num_images": 4, "sample_steps": 2},
    # the fixtures exercise the proxy path (params.yaml's world default tunes two_stage on the photos)
    "student": {"steps": 4, "batch_size": 2, "method": "proxy_tuning", "data": "proxies"},
    "evaluate": {"prompts_per_model": 2},
}


class RecordingLogger:
    """Stands in for MLflow in unit tests and remembers what a stage logged."""

    def __init__(self):
        self.logged: list[tuple[dict, int | None]] = []
        self.artifacts: list[str] = []

    def metrics(self, values, step=None):
        self.logged.append((dict(values), step))

    def artifact(self, path, folder=None):
        self.artifacts.append(str(path))


def assert_one_line(err: pytest.ExceptionInfo, *names: str) -> str:
    """The error a user sees is one line and names each of `names` (file or parameter)."""
    msg = str(err.value)
    assert msg and "\n" not in msg, f"error message must be one line: {msg!r}"
    for name in names:
        assert name in msg, f"{name!r} not named in {msg!r}"
    return msg


def copy_project(dest: Path, overrides: dict | None = None) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for section, values in {**FAST, **(overrides or {})}.items():
        params.setdefault(section, {}).update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


@pytest.fixture(scope="session")
def built_models(tmp_path_factory) -> Path:
    """models/tiny and data/demo_subject, built once by the real bootstrap stage."""
    from proxytune.params import load_params
    from tasks import bootstrap

    root = copy_project(tmp_path_factory.mktemp("built"))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        bootstrap.run(load_params(), RecordingLogger())
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def project(tmp_path, built_models, monkeypatch) -> Path:
    """A fresh project folder (cwd) with the tiny models in place and isolated MLflow/Prefect stores."""
    root = copy_project(tmp_path / "proj")
    for name in ("models", "data"):
        shutil.copytree(built_models / name, root / name, dirs_exist_ok=True)
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setenv("PROXYTUNE_CACHE", str(root / ".proxytune" / "cache"))
    return root


@pytest.fixture
def log() -> RecordingLogger:
    return RecordingLogger()


@pytest.fixture(scope="session")
def staged(tmp_path_factory, built_models) -> Path:
    """prepare -> supervise -> synthesize with the FAST settings, run once per session; tests copy, never edit, it."""
    from proxytune.params import load_params
    from tasks import prepare, supervise, synthesize

    root = copy_project(tmp_path_factory.mktemp("staged-through-synthesize"))
    for name in ("models", "data"):
        shutil.copytree(built_models / name, root / name, dirs_exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("PROXYTUNE_CACHE", str(root / ".proxytune" / "cache"))
        params = load_params()
        for stage in (prepare, supervise, synthesize):
            stage.run(params, RecordingLogger())
    return root


@pytest.fixture
def synthesized(project, staged) -> Path:
    """A project whose outputs already hold prepare, supervise and synthesize results."""
    shutil.copytree(staged / "outputs", project / "outputs")
    return project

"""Shared fixtures: throw-away data folders for the stages, with the embedded tiny default built once per session."""
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

# The models are tiny: one intra-op thread is as fast and never spin-waits when the 2 cores are busy. CI also runs
# the suite with OMP_NUM_THREADS=2, so the tolerances are checked against another float reduction order.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))
THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def threads_unchanged():
    """Byte-exact checks compare against session fixtures rendered at THREADS; a test that leaves torch on
    another thread count changes later tests' float reduction order, so it fails here, where it happened."""
    yield
    assert torch.get_num_threads() == THREADS, "the test changed torch's thread count and did not restore it"

REPO = Path(__file__).resolve().parent.parent
# The tests run in the project (cwd = REPO: dvc.yaml and the shipped models/world are read from there) and
# hand every stage its paths; each test's data lives in a tmp folder laid out as dvc.yaml lays the project out.
BUILT = ("models/tiny", "data/demo_subject")  # written by bootstrap: each test folder gets its own copy

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


def paths(root: Path, stage: str) -> dict[str, Path]:
    """`stage`'s paths inside the test folder `root`, as dvc.yaml lays them out in the project."""
    from orchestration.cache import stage_paths

    return stage_paths(stage, root)


def in_folder(params: dict, root: Path) -> dict:
    """`params` with the paths bootstrap writes (tiny models, demo photos) pointing into `root`."""
    def move(value):
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        if isinstance(value, str) and value.startswith(BUILT):
            return str(root / value)
        return value

    return move(params)


def write_params(root: Path, overrides: dict | None = None) -> Path:
    """`root/params.yaml`: the project's params with FAST and `overrides`, the built paths inside `root`."""
    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in {**FAST, **(overrides or {})}.items():
        params.setdefault(section, {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(in_folder(params, root), sort_keys=False))
    return root / "params.yaml"


def edit_params(root: Path, section: str, **values) -> None:
    """Change values of one section of `root/params.yaml`, as a user editing the file would."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="session")
def built_models(tmp_path_factory) -> Path:
    """models/tiny and data/demo_subject, built once by the real bootstrap stage."""
    from proxytune.params import load_params
    from tasks import bootstrap

    root = tmp_path_factory.mktemp("built")
    bootstrap.run(load_params(write_params(root)), RecordingLogger(), paths(root, "bootstrap"))
    return root


def _with_built(root: Path, built: Path) -> None:
    for name in BUILT:
        shutil.copytree(built / name, root / name, dirs_exist_ok=True)


@pytest.fixture
def project(tmp_path, built_models, monkeypatch) -> Path:
    """A fresh test folder: params.yaml, its own tiny models and demo photos, isolated MLflow/cache stores."""
    root = tmp_path / "proj"
    write_params(root)
    _with_built(root, built_models)
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

    root = tmp_path_factory.mktemp("staged-through-synthesize")
    params = load_params(write_params(root))
    _with_built(root, built_models)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PROXYTUNE_CACHE", str(root / ".proxytune" / "cache"))
        for stage in (prepare, supervise, synthesize):
            stage.run(params, RecordingLogger(), paths(root, stage.__name__.rsplit(".", 1)[-1]))
    return root


@pytest.fixture
def synthesized(project, staged) -> Path:
    """A test folder whose outputs already hold prepare, supervise and synthesize results."""
    shutil.copytree(staged / "outputs", project / "outputs")
    return project

"""DVC drives the stages: `dvc repro` runs them all, then reports everything up to date; git carries the metrics
and loss curves, so experiments compare in `dvc exp show`, `dvc metrics diff` and `dvc plots diff`; the plots
page draws offline. The first stage starts one Prefect server and every later stage, of this `dvc repro` and the
next, reports to it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FAST, REPO

from orchestration import server

BIN = Path(sys.executable).parent


def clone_project(dest: Path) -> Path:
    """What a fresh clone of the working tree holds (DVC needs a git repository of its own), with the suite's
    FAST params."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for section, values in FAST.items():
        params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def _run(args, cwd, env):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture
def prefect_home(tmp_path, monkeypatch):
    """Where the stages' own server keeps its records, on a free port of its own; stopped by its recorded pid."""
    home = tmp_path / "prefect-home"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.setenv("PREFECT_SERVER_API_PORT", str(server.free_port()))
    yield home
    server.stop(home)


def test_dvc_repro_then_up_to_date_then_experiment(tmp_path, prefect_home):
    root = clone_project(tmp_path / "proj")
    # As after `make demo`: the project's .venv holds the stack, and nothing is activated or on PATH.
    (root / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p).resolve() != BIN.resolve())
    env = {**os.environ, "PATH": path,
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "PROXYTUNE_CACHE": str(root / ".cache")}
    for name in ("PREFECT_API_URL", "VIRTUAL_ENV", "PROXYTUNE_PYTHON"):
        env.pop(name, None)
    git = ["git", "-c", "user.email=ci@proxytune", "-c", "user.name=ci"]
    _run(git + ["init", "-q"], root, env)
    with open(root / ".gitignore", "a") as ignore:  # the clone's own, plus where this test keeps its cache
        ignore.write("/.cache\n")

    first = _run([str(BIN / "dvc"), "repro"], root, env)
    for stage in ("bootstrap", "prepare", "supervise", "synthesize", "distill", "evaluate"):
        assert f"Running stage '{stage}'" in first
    started = json.loads((prefect_home / "server.json").read_text())
    assert _flow_run_names(started["api"]) == {"bootstrap", "prepare", "supervise", "synthesize", "distill",
                                               "evaluate"}

    second = _run([str(BIN / "dvc"), "repro"], root, env)
    assert "Running stage" not in second
    assert "up to date" in _run([str(BIN / "dvc"), "status"], root, env)

    # Retraining with the same seed writes the same bytes, so nothing downstream is stale.
    shutil.rmtree(root / "outputs" / "supervise")
    retrain = _run([str(BIN / "dvc"), "repro", "--no-run-cache", "--single-item", "supervise"], root, env)
    assert "Running stage 'supervise'" in retrain and f"{'supervise':<11} ran" in retrain  # trained, not cached
    assert "up to date" in _run([str(BIN / "dvc"), "status"], root, env)

    metrics = json.loads(_run([str(BIN / "dvc"), "metrics", "show", "--json"], root, env))
    assert "dino" in json.dumps(metrics)

    # git keeps the metrics and loss curves, so commits and experiments carry them.
    _run(git + ["add", "-A"], root, env)
    _run(git + ["commit", "-qm", "pipeline"], root, env)
    assert _run(git + ["ls-files", "outputs"], root, env).split() == [
        "outputs/distill_loss.csv", "outputs/metrics.json", "outputs/supervise_loss.csv"]
    exp = _run([str(BIN / "dvc"), "exp", "run", "-n", "fewer-steps", "-S", "student.steps=3"], root, env)
    assert "Running stage 'distill'" in exp and "Running stage 'evaluate'" in exp
    assert "Running stage 'supervise'" not in exp
    exp = _run([str(BIN / "dvc"), "exp", "run", "-n", "one-prompt", "-S", "evaluate.prompts_per_model=1"], root, env)
    assert "Running stage 'evaluate'" in exp and "Running stage 'distill'" not in exp

    shown = _experiments(json.loads(_run([str(BIN / "dvc"), "exp", "show", "--json"], root, env)))
    assert set(shown) == {"fewer-steps", "one-prompt"}, shown
    for name, prompts in (("fewer-steps", 2), ("one-prompt", 1)):
        assert shown[name]["params"]["params.yaml"]["data"]["evaluate"]["prompts_per_model"] == prompts
    dino = {name: data["metrics"]["outputs/metrics.json"]["data"]["student"]["dino"] for name, data in shown.items()}
    assert dino["fewer-steps"] != dino["one-prompt"], dino
    assert json.loads((prefect_home / "server.json").read_text()) == started  # one server all along

    diff = json.loads(_run([str(BIN / "dvc"), "metrics", "diff", "HEAD", "one-prompt", "--json"], root, env))
    assert "student.dino" in diff["outputs/metrics.json"], diff
    _run([str(BIN / "dvc"), "plots", "diff", "HEAD", "fewer-steps", "-o", "plots"], root, env)
    assert "fewer-steps" in (root / "plots" / "index.html").read_text()


def _flow_run_names(api: str) -> set[str]:
    """The stages whose flow runs the server at `api` holds (runs are named `<stage> · <subject> · <hash>`)."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return {run.name.split(" · ")[0] for run in client.read_flow_runs()}


def _experiments(shown: list) -> dict:
    """`dvc exp show --json`'s experiments, by name: each one's params and metrics."""
    return {rev["name"]: rev["data"] for baseline in shown for exp in baseline.get("experiments") or []
            for rev in exp["revs"]}


def test_plots_page_draws_offline(tmp_path):
    """`dvc plots show` fills .dvc/config's template, which carries vega itself: the page loads nothing."""
    root = tmp_path / "proj"
    for name in (".dvc/config", "dvc.yaml", "params.yaml", "vendor/vega/plots.html"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    (root / "outputs").mkdir()
    for stage in ("supervise", "distill"):
        (root / "outputs" / f"{stage}_loss.csv").write_text("step,loss\n1,0.9\n2,0.5\n3,0.4\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    _run([str(BIN / "dvc"), "plots", "show"], root, os.environ)
    page = (root / "dvc_plots" / "index.html").read_text()
    assert "<script src" not in page and "vegaEmbed(" in page
    assert "supervise_loss.csv" in page and "distill_loss.csv" in page

"""Stage processes against one long-lived Prefect server on 127.0.0.1, as under `dvc repro`: a stage killed
mid-training ends Crashed in the UI instead of Running forever, and stage processes reuse the recorded server."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, edit_params

from orchestration import server


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """One server for this module's tests (each tells its runs apart by its own project folder), stopped by its pid:
    starting a server with a fresh database costs about 12 s."""
    process, api = server.start(tmp_path_factory.mktemp("prefect-home"))
    yield api
    process.terminate()
    process.wait(timeout=60)


def _flow_runs(api: str, under: Path):
    """The flow runs whose data lives below `under` (a test's project), each with its task runs."""
    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return [(run, client.read_task_runs(task_run_filter=TaskRunFilter(
                    flow_run_id=TaskRunFilterFlowRunId(any_=[run.id]))))
                for run in client.read_flow_runs() if run.parameters.get("under") == str(under)]


@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stage_killed_mid_training_ends_crashed(project, prefect_api, kill):
    """SIGTERM (`kill PID`): the stage reports its own crash. SIGKILL (the OOM killer): the process cannot, so the
    server's crash watch marks the run once its heartbeats stop (here after 45 s: the minimum period is 30)."""
    from datetime import timedelta

    server.watch_for_crashes(prefect_api, silence=timedelta(seconds=45))
    edit_params(project, "supervisor", steps=100_000, checkpoint_every=0)
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    stage = subprocess.Popen(
        [sys.executable, "-m", "flows.pipeline", "--params", str(project / "params.yaml"), "--under", str(project),
         "--stage", "prepare", "--stage", "supervise"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    for line in stage.stderr:  # the first step's log line: training is under way
        if "supervise: step 1/100000" in line:
            break
    else:
        pytest.fail(f"the stage ended before training (exit {stage.wait()})")
    stage.send_signal(kill)
    stage.communicate(timeout=120)
    assert stage.returncode != 0

    deadline = time.monotonic() + 240  # the watch fires 45 s after the last heartbeat, then checks every few seconds
    while (run := _flow_runs(prefect_api, project)[0][0]).state.type.value == "RUNNING" and time.monotonic() < deadline:
        time.sleep(2)
    [(run, task_runs)] = _flow_runs(prefect_api, project)
    assert run.state.type.value == "CRASHED", run.state
    if kill == signal.SIGTERM:  # a killed process leaves its task runs as they were; the run itself says Crashed
        assert {t.name.split("-")[0]: t.state.type.value for t in task_runs}["supervise"] == "CRASHED"
    else:
        assert "no heartbeat for 45 s" in run.state.message


def test_stage_processes_reuse_the_recorded_server(tmp_path, prefect_api, monkeypatch):
    home = tmp_path / "prefect-home"
    home.mkdir()
    (home / "server.json").write_text(json.dumps({"api": prefect_api, "pid": 0}))
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert server.ensure(home) == prefect_api  # nothing new started
    code = ("from orchestration import server; from prefect.settings import get_current_settings as s\n"
            "with server.reused() as api: print(api, s().api.url)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"})
    assert out.stdout.split() == [prefect_api, prefect_api], out.stderr


def test_a_deployment_runs_another_subject_from_typed_overrides(project, prefect_api, tmp_path):
    """As the UI's Run form does: the served deployment, new photos and class noun, no params.yaml edited."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    photos = tmp_path / "cup_photos"
    shutil.copytree(project / "data/demo_subject", photos)
    served = subprocess.Popen([sys.executable, "-m", "flows.serve"], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "PREFECT_API_URL": prefect_api})
    try:
        overrides = {"subject": {"name": "red_cup", "images": str(photos), "class_noun": "cup"}}
        with temporary_settings({PREFECT_API_URL: prefect_api}):
            _wait_for_deployment("proxytune/full", served)
            run = run_deployment("proxytune/full", timeout=900, parameters={
                "params_file": str(project / "params.yaml"), "under": str(project),
                "stages": ["prepare", "supervise"], "overrides": overrides})
    finally:
        served.terminate()
        served.wait(timeout=60)
    assert run.state.type.value == "COMPLETED", run.state
    assert run.name.startswith("prepare+supervise · red_cup · ") and run.parameters["overrides"] == overrides
    assert "red_cup" not in (project / "params.yaml").read_text()
    deadline = time.monotonic() + 60  # the run's process sends its last logs in a batch as it exits
    while True:
        keys, logs = _artifacts_and_logs(prefect_api, run.id)
        if any(m.startswith("supervise: step 4/4 loss ") for m in logs) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert {"prepare-red-cup", "supervise-red-cup", "supervise-red-cup-progress"} <= keys
    assert any(m.startswith("supervise: step 4/4 loss ") for m in logs), logs
    assert '"a sks cup"' in (project / "outputs/prepare/captions.jsonl").read_text()


def test_overrides_are_checked_before_any_stage_starts(project):
    from flows.pipeline import pipeline

    state = pipeline(params_file=str(project / "params.yaml"), under=str(project), return_state=True,
                     overrides={"supervisor": {"steps": -5}, "subject": {"class_noun": "cup"}})
    assert state.is_failed() and state.message == "params: supervisor.steps = -5: must be >= 1"
    assert not (project / "outputs").exists()


def _wait_for_deployment(name: str, served: subprocess.Popen, seconds: float = 300) -> None:
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + seconds
    with get_client(sync_client=True) as client:
        while True:
            try:
                client.read_deployment_by_name(name)
                return
            except ObjectNotFound:
                if served.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"deployment {name} was not registered (serve exit code {served.poll()})")
                time.sleep(1)


def _artifacts_and_logs(api: str, run_id) -> tuple[set[str], list[str]]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return {a.key for a in artifacts}, [log.message for log in logs]

"""Stage processes against one long-lived Prefect server on 127.0.0.1, as under `dvc repro`: a stage killed
mid-training ends Crashed in the UI instead of Running forever, and stage processes reuse the recorded server."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import REPO, edit_params

from orchestration import server


@pytest.fixture
def prefect_api(tmp_path):
    """A server of this test's own, stopped by its pid."""
    process, api = server.start(tmp_path / "prefect-home")
    yield api
    process.terminate()
    process.wait(timeout=60)


def _flow_runs(api: str):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return [(run, client.read_task_runs()) for run in client.read_flow_runs()]


def test_a_stage_killed_mid_training_ends_crashed(project, prefect_api):
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
    stage.send_signal(signal.SIGTERM)  # what `kill PID` sends
    stage.communicate(timeout=120)
    assert stage.returncode != 0

    [(run, task_runs)] = _flow_runs(prefect_api)
    assert run.state.type.value == "CRASHED", run.state
    assert {t.name.split("-")[0]: t.state.type.value for t in task_runs}["supervise"] == "CRASHED"


def test_stage_processes_reuse_the_recorded_server(tmp_path, prefect_api, monkeypatch):
    home = tmp_path / "prefect-home"
    (home / "server.json").write_text(json.dumps({"api": prefect_api, "pid": 0}))
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert server.ensure(home) == prefect_api  # nothing new started
    code = ("from orchestration import server; from prefect.settings import get_current_settings as s\n"
            "with server.reused() as api: print(api, s().api.url)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"})
    assert out.stdout.split() == [prefect_api, prefect_api], out.stderr

"""The MLflow parent run: handed from stage to stage by its driver's run file, never searched for; closed by the
last stage or its flow; settled (KILLED / FINISHED) at the next start when its driver is gone."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import mlflow
import pytest
from conftest import REPO, write_params

from orchestration import compare, tracking
from proxytune.params import load_params

# Stands in for `dvc repro`: a process named dvc that runs each stage named on its command line as a process of
# its own, with DVC_STAGE set, as DVC does.
FAKE_DVC = textwrap.dedent("""\
    import os, subprocess, sys
    stage = ("import sys; from orchestration import tracking; from proxytune.params import load_params\\n"
             "with tracking.stage_run(sys.argv[1], load_params(sys.argv[2]), {}) as log:\\n"
             "    log.metrics({'x': 1.0})\\n")
    for name in sys.argv[2:]:
        subprocess.run([sys.executable, "-c", stage, name, sys.argv[1]], check=True,
                       env={**os.environ, "DVC_STAGE": name})
""")


@pytest.fixture
def params(tmp_path, monkeypatch) -> dict:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])  # this process's searches too, not the last test's
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return load_params(write_params(tmp_path, {"student": {"steps": 7}}))


def _parents() -> list:
    return mlflow.search_runs(experiment_names=[tracking.EXPERIMENT], output_format="list",
                              filter_string=f"tags.`{tracking.PARENT_TAG}` = 'true'",
                              order_by=["attributes.start_time ASC"])


def _stages(parent) -> dict[str, str]:
    runs = mlflow.search_runs(experiment_names=[tracking.EXPERIMENT], output_format="list",
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {r.data.tags["stage"]: r.info.status for r in runs}


def test_one_parent_per_flow_named_after_what_differs_with_the_final_metrics(params):
    with tracking.pipeline_run():
        with tracking.stage_run("distill", params, {}) as log:
            log.metrics({"loss": 2.0}, step=1)
            log.metrics({"loss": 1.5}, step=2)
        with tracking.stage_run("evaluate", params, {}) as log:
            log.metrics({"student.dino": 0.25})
    (parent,) = _parents()
    assert parent.info.status == "FINISHED" and _stages(parent) == {"distill": "FINISHED", "evaluate": "FINISHED"}
    assert parent.data.metrics == {"distill.loss": 1.5, "student.dino": 0.25}
    assert parent.info.run_name.startswith(f"demo_toy {params['student']['method']} ")
    assert "student.steps=7" in parent.data.tags["params.differ"]
    table = compare.runs_table()  # pipeline runs side by side, by their parents' metrics
    assert table[["run", "method", "dino"]].values.tolist() == [
        [f"{parent.info.run_name} {parent.info.run_id[:8]}", "student", 0.25]]

    with tracking.pipeline_run():  # the next flow: a parent of its own, closed when the flow ends
        with tracking.stage_run("prepare", params, {}):
            pass
    assert [p.info.status for p in _parents()] == ["FINISHED", "FINISHED"]


def test_a_failing_stage_fails_its_parent_and_the_next_run_starts_afresh(params):
    with pytest.raises(RuntimeError), tracking.pipeline_run():
        with tracking.stage_run("prepare", params, {}):
            raise RuntimeError("boom")
    with tracking.stage_run("prepare", params, {}):
        pass
    failed, fresh = _parents()
    assert failed.info.status == "FAILED" and _stages(failed) == {"prepare": "FAILED"}
    assert fresh.info.status == "FINISHED"


def test_a_parent_whose_driver_died_is_killed_at_the_next_start(params, tmp_path):
    _, client, exp_id = tracking.setup()
    dead = client.create_run(exp_id, tags={tracking.PARENT_TAG: "true"}).info.run_id
    cut = client.create_run(exp_id, tags={"stage": "supervise", "mlflow.parentRunId": dead}).info.run_id
    folder = tmp_path / ".proxytune" / "mlflow-runs"
    folder.mkdir(parents=True)
    (folder / f"{os.getpid()}-1.json").write_text(json.dumps({"run_id": dead}))  # this pid, another start time

    with tracking.stage_run("prepare", params, {}):
        pass
    assert client.get_run(dead).info.status == "KILLED" and client.get_run(cut).info.status == "KILLED"
    assert [p.info.status for p in _parents()] == ["KILLED", "FINISHED"]
    assert list(folder.iterdir()) == []


def test_stages_run_by_one_dvc_process_share_its_parent_until_it_is_gone(params, tmp_path):
    (tmp_path / "dvc").write_text(FAKE_DVC)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    dvc = [sys.executable, str(tmp_path / "dvc"), str(tmp_path / "params.yaml")]
    subprocess.run([*dvc, "prepare", "supervise"], cwd=REPO, env=env, check=True)
    (first,) = _parents()
    assert first.info.status == "RUNNING", "no evaluate yet: the parent stays open for the next stage"
    assert _stages(first) == {"prepare": "FINISHED", "supervise": "FINISHED"}

    subprocess.run([*dvc, "distill"], cwd=REPO, env=env, check=True)  # the next `dvc repro`
    first, second = _parents()
    assert first.info.status == "FINISHED", "its driver ended with no stage cut off"
    assert _stages(second) == {"distill": "FINISHED"} and first.data.metrics == {"prepare.x": 1.0, "supervise.x": 1.0}

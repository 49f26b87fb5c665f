"""MLflow bookkeeping: a project-local sqlite store, one parent run per pipeline run, a nested run per stage.

Stages run in separate processes under `dvc repro`, so the parent run is found again through a tag:
the newest parent still RUNNING is the current pipeline run; `evaluate` (the last stage) closes it, and
a failing stage marks it FAILED, so the next invocation starts a fresh parent.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

import yaml

from proxytune.io import sha256_json

EXPERIMENT = "proxytune"
PARENT_TAG = "proxytune.pipeline"
LAST_STAGE = "evaluate"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _artifact_root() -> Path:
    """Artifacts sit beside a sqlite store (`mlflow.db` -> `mlartifacts/`), so a store elsewhere keeps its own."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts"
    return Path.cwd() / "mlartifacts"


def setup():
    """(mlflow, client, experiment id) for the project's store, creating the experiment on first use."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        artifacts = _artifact_root().as_uri()
        exp_id = client.create_experiment(EXPERIMENT, artifact_location=artifacts)
    else:
        exp_id = exp.experiment_id
    return mlflow, client, exp_id


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _prefect_flow_run_id() -> str:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id or "none")
    except Exception:  # outside a flow the runtime has nothing to say
        return "none"


def _dvc_data_hashes() -> dict[str, str]:
    """The md5s DVC recorded for every stage output so far (dvc.lock), as tags."""
    lock = Path("dvc.lock")
    if not lock.is_file():
        return {}
    tags = {}
    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for out in stage.get("outs", []) or []:
            if "md5" in out:
                tags[f"dvc.md5.{out['path']}"] = out["md5"]
    return tags


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


def _open_parent(mlflow, client, exp_id, params: dict) -> str:
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.`{PARENT_TAG}` = 'true' and attributes.status = 'RUNNING'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if runs:
        return runs[0].info.run_id
    run = client.create_run(exp_id, run_name=f"pipeline-{params['subject']['name']}", tags={
        PARENT_TAG: "true", "git.commit": _git_commit(), "subject": params["subject"]["name"],
        "params.sha256": sha256_json(params),
    })
    client.log_batch(run.info.run_id, params=[
        mlflow.entities.Param(k[:250], v[:6000]) for k, v in _flatten(params).items()
    ])
    return run.info.run_id


class StageLogger:
    """What a stage may log: kept tiny so training code only sees a callback, never MLflow itself."""

    def __init__(self, mlflow):
        self._mlflow = mlflow

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path=folder or path.name)
        else:
            self._mlflow.log_artifact(str(path), artifact_path=folder)


@contextlib.contextmanager
def stage_run(stage: str, params: dict, stage_params: dict) -> Iterator[StageLogger]:
    mlflow, client, exp_id = setup()
    parent = _open_parent(mlflow, client, exp_id, params)
    tags = {"stage": stage, "git.commit": _git_commit(), "prefect.flow_run_id": _prefect_flow_run_id(),
            **_dvc_data_hashes()}
    with mlflow.start_run(run_id=parent):
        # An exception leaving these contexts marks both runs FAILED.
        with mlflow.start_run(run_name=stage, experiment_id=exp_id, nested=True, tags=tags):
            mlflow.log_params({k[:250]: v[:6000] for k, v in _flatten(stage_params).items()})
            yield StageLogger(mlflow)
    # Leaving the parent's context marked it FINISHED; reopen it for the next stage's process.
    if stage != LAST_STAGE:
        client.set_tag(parent, "last_stage", stage)
        client.update_run(parent, status="RUNNING")

"""MLflow bookkeeping: a project-local sqlite store, one parent run per pipeline run, a nested run per stage.

A pipeline run lives as long as its *driver*: the `dvc repro` / `dvc exp run` process when a stage runs under DVC
(which sets DVC_STAGE for its commands; every stage is then a process of its own), else the process running the
flow. The first stage that runs creates the parent and writes its id to a run file named after the driver
(`.proxytune/mlflow-runs/<pid>-<start>.json` beside the store); every later stage of the same driver reads the
id there, so the parent is handed over, never searched for, and two concurrent runs never share one.

The parent is closed by `evaluate` (the last stage), by a failing stage (FAILED), or when a flow that is its own
driver ends (`pipeline_run`). A run file whose driver is gone (killed, or a `dvc repro` that ended before
`evaluate`) is settled at the next start: a stage run still RUNNING was cut off, so it and the parent become
KILLED; otherwise the parent's stages all ended and it is FINISHED.

The parent carries every stage's final metrics (evaluate's under their own names, `student.dino`..., the
others as `<stage>.<metric>`), so pipeline runs compare side by side, and a name that says subject, method and
what differs from the defaults (the DVC experiment's name when there is one).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import psutil  # a dependency of dvc, accelerate and peft
import yaml

from proxytune.io import atomic_write_text, sha256_json

EXPERIMENT = "proxytune"
PARENT_TAG = "proxytune.pipeline"
LAST_STAGE = "evaluate"
SCORED_STAGE = LAST_STAGE  # its metrics keep their names on the parent
EXPERIMENT_KIND = "mlflow.experimentKind"
TRAINING_VIEW = {EXPERIMENT_KIND: "custom_model_development"}  # the UI shows runs and metrics, not GenAI traces
NAMED_DIFFERENCES = 3  # how many differing params a parent's name lists before "+N"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _store_dir() -> Path:
    """The folder of a sqlite store (artifacts and run files sit beside it), else the working directory."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).resolve().parent
    return Path.cwd()


def _artifact_root() -> Path:
    """Artifacts sit beside a sqlite store (`mlflow.db` -> `mlartifacts/`), so a store elsewhere keeps its own."""
    return _store_dir() / "mlartifacts"


def setup():
    """(mlflow, client, experiment id) for the project's store, creating the experiment on first use."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        artifacts = _artifact_root().as_uri()
        exp_id = client.create_experiment(EXPERIMENT, artifact_location=artifacts, tags=TRAINING_VIEW)
    else:
        exp_id = exp.experiment_id
        if exp.tags.get(EXPERIMENT_KIND) != TRAINING_VIEW[EXPERIMENT_KIND]:  # a store made before the tag
            client.set_experiment_tag(exp_id, EXPERIMENT_KIND, TRAINING_VIEW[EXPERIMENT_KIND])
    return mlflow, client, exp_id


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def prefect_flow_run_id() -> str:
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


# ---------------------------------------------------------------- who a pipeline run belongs to

def _is_dvc(process: psutil.Process) -> bool:
    try:
        argv = process.cmdline()
    except psutil.Error:
        return False
    return any(Path(a).name == "dvc" for a in argv[:2]) or argv[1:3] == ["-m", "dvc"]


def _driver() -> psutil.Process:
    """The process the current pipeline run lasts as long as: DVC's, for a stage it runs, else this one."""
    me = psutil.Process()
    if "DVC_STAGE" in os.environ:
        return next((p for p in me.parents() if _is_dvc(p)), me)
    return me


def _runs_folder() -> Path:
    return _store_dir() / ".proxytune" / "mlflow-runs"


def _run_file(driver: psutil.Process) -> Path:
    return _runs_folder() / f"{driver.pid}-{round(driver.create_time() * 1000)}.json"


def _alive(run_file: Path) -> bool:
    pid, started = (int(part) for part in run_file.stem.split("-"))
    try:
        return round(psutil.Process(pid).create_time() * 1000) == started
    except psutil.Error:
        return False


def _settle(client, run_file: Path) -> None:
    """Close the parent of a driver that is gone: KILLED if a stage was cut off, else FINISHED."""
    from mlflow.exceptions import MlflowException

    try:
        run_id = json.loads(run_file.read_text())["run_id"]
    except FileNotFoundError:  # another run's start settled it first
        return
    try:
        parent = client.get_run(run_id)
    except MlflowException:  # the store was reset since
        parent = None
    if parent is not None and parent.info.status == "RUNNING":
        cut = client.search_runs([parent.info.experiment_id], filter_string=(
            f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'"))
        for stage in cut:
            client.set_terminated(stage.info.run_id, "KILLED")
        client.set_terminated(run_id, "KILLED" if cut else "FINISHED")
    run_file.unlink(missing_ok=True)


def _settle_orphans(client) -> None:
    folder = _runs_folder()
    for run_file in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if not _alive(run_file):
            _settle(client, run_file)


# ---------------------------------------------------------------- the parent run

def _differences(params: dict) -> dict[str, str]:
    """The params that differ from the schema's defaults (the committed params.yaml), the subject aside."""
    from proxytune.schema import validate

    defaults = _flatten(validate({"subject": params["subject"]}))
    return {k: v for k, v in _flatten(params).items() if defaults.get(k) != v and not k.startswith("subject.")}


def parent_name(params: dict) -> str:
    """`<subject> <method> <what differs>`: the DVC experiment's name, else the params off their defaults."""
    differs = _differences(params)
    named = [f"{k}={v}" for k, v in differs.items()][:NAMED_DIFFERENCES]
    if len(differs) > NAMED_DIFFERENCES:
        named.append(f"+{len(differs) - NAMED_DIFFERENCES}")
    what = os.environ.get("DVC_EXP_NAME") or " ".join(named) or "defaults"
    return f"{params['subject']['name']} {params['student']['method']} {what}"


def _create_parent(mlflow, client, exp_id, params: dict) -> str:
    differs = _differences(params)
    tags = {PARENT_TAG: "true", "git.commit": _git_commit(), "subject": params["subject"]["name"],
            "method": params["student"]["method"], "params.sha256": sha256_json(params),
            "params.differ": ", ".join(f"{k}={v}" for k, v in differs.items())[:5000] or "none"}
    if exp_name := os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = exp_name
    run = client.create_run(exp_id, run_name=parent_name(params), tags=tags)
    client.log_batch(run.info.run_id, params=[
        mlflow.entities.Param(k[:250], v[:6000]) for k, v in _flatten(params).items()
    ])
    return run.info.run_id


def _parent(mlflow, client, exp_id, params: dict) -> tuple[str, Path]:
    """The current pipeline run's parent id and run file: the driver's, else a new one."""
    _settle_orphans(client)
    run_file = _run_file(_driver())
    if run_file.is_file():
        run_id = json.loads(run_file.read_text())["run_id"]
        if client.get_run(run_id).info.status == "RUNNING":
            return run_id, run_file
    run_id = _create_parent(mlflow, client, exp_id, params)
    atomic_write_text(run_file, json.dumps({"run_id": run_id, "created": time.time()}))
    return run_id, run_file


def _close(client, run_id: str, run_file: Path, status: str) -> None:
    client.set_terminated(run_id, status)
    run_file.unlink(missing_ok=True)


_flows_open = 0  # pipeline_run depth in this process


@contextlib.contextmanager
def pipeline_run() -> Iterator[None]:
    """Bracket a flow: when it ends, the parent this process drives (not DVC's) is closed, FINISHED, or KILLED
    when interrupted. A stage run alone brackets itself."""
    global _flows_open
    _flows_open += 1
    status = "KILLED"
    try:
        yield
        status = "FINISHED"
    finally:
        _flows_open -= 1
        driver = _driver()
        run_file = _run_file(driver)
        if _flows_open == 0 and driver.pid == os.getpid() and run_file.is_file():
            _, client, _ = setup()
            _close(client, json.loads(run_file.read_text())["run_id"], run_file, status)


def _copy_final_metrics(client, stage: str, stage_run_id: str, parent: str) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    final = client.get_run(stage_run_id).data.metrics  # the latest value of each
    client.log_batch(parent, metrics=[
        Metric(k if stage == SCORED_STAGE else f"{stage}.{k}", v, now, 0) for k, v in sorted(final.items())
    ])


# ---------------------------------------------------------------- a stage

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

    def model(self, role: str, folder: str | Path, params: dict) -> None:
        """`folder` (a stage's output) as an MLflow model, registered for the subject (`orchestration.registry`)."""
        from orchestration import registry

        registry.log_model(role, Path(folder), params)


@contextlib.contextmanager
def stage_run(stage: str, params: dict, stage_params: dict) -> Iterator[StageLogger]:
    """The stage's nested run under the pipeline run's parent; a stage that raises fails both."""
    mlflow, client, exp_id = setup()
    with pipeline_run():
        parent, run_file = _parent(mlflow, client, exp_id, params)
        tags = {"stage": stage, "git.commit": _git_commit(), "prefect.flow_run_id": prefect_flow_run_id(),
                "mlflow.parentRunId": parent, **_dvc_data_hashes()}
        child = client.create_run(exp_id, run_name=stage, tags=tags).info.run_id
        try:
            with mlflow.start_run(run_id=child):
                mlflow.log_params({k[:250]: v[:6000] for k, v in _flatten(stage_params).items()})
                yield StageLogger(mlflow)
        except BaseException as e:
            status = "FAILED" if isinstance(e, Exception) else "KILLED"
            client.set_terminated(child, status)
            _close(client, parent, run_file, status)
            raise
        _copy_final_metrics(client, stage, child, parent)
        client.set_tag(parent, "last_stage", stage)
        if stage == LAST_STAGE:
            _close(client, parent, run_file, "FINISHED")

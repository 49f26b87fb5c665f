"""The benchmark's subjects as flow runs of a deployment on a Prefect work pool, and the cross-subject report.

Each subject gets `runs/<name>/` below the shared data root (`under`: a folder every worker sees, the project by
default) holding its own params.yaml (the project's, with the subject swapped in) and every stage's data, laid
out as in dvc.yaml; the code and the models stay in the project. A worker runs each subject in a process of its
own, so one that crashes or exhausts memory takes only itself down. Results travel through MLflow, not the
filesystem: each subject logs its evaluation (table, metrics, grid, cache stats) to a run tagged with its Prefect
flow run id in the one tracking store every process is pointed at (`tracking.tracking_uri`), and the aggregate
downloads them from there, so a subject may run on another machine against a tracking server.
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from pathlib import Path
from uuid import UUID

import pandas as pd
import yaml
from prefect import task

from orchestration import pool, tracking
from proxytune import reports
from proxytune.dreambench import Subject
from proxytune.io import atomic_dir, atomic_write_text, cache_dir
from proxytune.params import ProxytuneError
from proxytune.reports import CACHE_STATS_FILE, TABLE_FILE

RUNS = Path("runs")
STAGES = ["prepare", "supervise", "synthesize", "distill", "evaluate"]  # bootstrap runs once, in the project
DEPLOYMENT = "proxytune-subject/benchmark"
RESULT_TAG = "proxytune.benchmark.subject"
RESULTS = "subject"  # the artifact folder of a subject's results
POLL_SECONDS = 2.0


def subject_params(base: dict, subject: Subject) -> dict:
    """The project's params with `subject` swapped in and DreamBench's prompts for its kind (live/object)."""
    params = copy.deepcopy(base)
    params["subject"] = {**params["subject"], "name": subject.name, "images": str(subject.images.resolve()),
                         "class_noun": subject.class_noun}
    params["evaluate"] = {**params["evaluate"], "prompts": list(subject.templates)}
    return params


def work_dir(under: str | Path, params: dict) -> Path:
    """`runs/<name>/` below `under`, holding the subject's params.yaml."""
    work = Path(under) / RUNS / params["subject"]["name"]
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / "params.yaml", yaml.safe_dump(params, sort_keys=False))
    return work


@task(name="record-subject")
def record_subject(name: str, outputs: dict[str, str], cached: bool) -> str:
    """Log the subject's evaluation to an MLflow run tagged with this flow run's id; return the MLflow run id."""
    mlflow, client, exp_id = tracking.setup()
    tags = {RESULT_TAG: name, "prefect.flow_run_id": tracking.prefect_flow_run_id(), "cached": str(cached).lower()}
    run = client.create_run(exp_id, run_name=f"subject {name}", tags=tags).info.run_id
    for path in (outputs["table"], outputs["metrics"], outputs["grid"], Path(outputs["table"]).parent / CACHE_STATS_FILE):
        client.log_artifact(run, str(path), RESULTS)
    client.set_terminated(run)
    return run


def shared_env() -> dict[str, str]:
    """Where every subject's process tracks and caches: this process's MLflow store and cache root, so results
    meet in one place (`MLFLOW_TRACKING_URI`, `PROXYTUNE_CACHE`; a tracking server's URL across machines)."""
    return {"MLFLOW_TRACKING_URI": tracking.tracking_uri(), "PROXYTUNE_CACHE": str(cache_dir(""))}


def start_subjects(params: list[dict], under: str) -> dict[str, UUID]:
    """A flow run of the subject deployment per subject, linked to the calling flow as a subflow, its data in
    `runs/<name>/` below `under`; returns their ids by subject."""
    from prefect.deployments import run_deployment

    env = shared_env()
    runs = {}
    for p in params:
        name = p["subject"]["name"]
        work = work_dir(under, p)
        run = run_deployment(DEPLOYMENT, parameters={"name": name, "params_file": str(work / "params.yaml"),
                                                     "under": str(work)},
                             flow_run_name=f"subject-{name}", timeout=0, as_subflow=True,
                             job_variables={"env": env})
        runs[name] = run.id
    return runs


def wait_for(runs: dict[str, UUID], pool_name: str) -> dict[str, object]:
    """The final state of each run, by subject; a run whose worker went silent is marked Crashed meanwhile."""
    from prefect import get_client

    final = {}
    with get_client(sync_client=True) as client:
        while len(final) < len(runs):
            waiting = [i for n, i in runs.items() if n not in final]
            pool.crash_orphans(client, pool_name, waiting)
            for name, run_id in runs.items():
                if name not in final and (state := client.read_flow_run(run_id).state).is_final():
                    final[name] = state
            if len(final) < len(runs):
                time.sleep(POLL_SECONDS)
    return final


def crash_orphans(pool_name: str) -> list[UUID]:
    """Mark Crashed the subject runs left Pending or Running by workers that are gone (a killed benchmark's)."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return pool.crash_orphans(client, pool_name)


def _result_run(client, exp_id: str, name: str, flow_run_id: UUID):
    found = client.search_runs([exp_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}' and "
                                         f"tags.`{RESULT_TAG}` = '{name}'", max_results=1)
    if not found:
        raise ProxytuneError(f"subject {name}: flow run {flow_run_id} completed but logged no results to "
                             f"{tracking.tracking_uri()} (is every worker pointed at the same MLflow store?)")
    return found[0]


@task(name="collect-subjects")
def collect(runs: dict[str, UUID], pool_name: str) -> dict[str, dict]:
    """Wait for the subject runs. Returns, by subject, the MLflow run holding the results of each that completed
    (`results`) and whether all its stages came from cache (`cached`), and why each other one did not (`failed`)."""
    states = wait_for(runs, pool_name)
    _, client, exp_id = tracking.setup()
    done = {n: _result_run(client, exp_id, n, runs[n]) for n, s in states.items() if s.is_completed()}
    return {"results": {n: r.info.run_id for n, r in done.items()},
            "cached": {n: r.data.tags["cached"] == "true" for n, r in done.items()},
            "failed": {n: f"{s.name}: {s.message}" for n, s in states.items() if not s.is_completed()}}


def _download(results: dict[str, str], into: Path) -> list[dict[str, str]]:
    """Each subject's result files, downloaded from its MLflow run into `into`/<name>/."""
    import mlflow

    files = []
    for name, run_id in results.items():
        where = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=RESULTS,
                                                         dst_path=str(into / name)))
        files.append({"subject": name, "table": where / TABLE_FILE, "metrics": where / "metrics.json",
                      "grid": where / "grid.png", "cache": where / CACHE_STATS_FILE})
    return files


@task(name="aggregate")
def aggregate(results: dict[str, str], failures: dict[str, str], out: str, label: str) -> dict[str, str]:
    """The cross-subject report in `out` from the subjects' MLflow runs (`results`: run id by subject): per
    subject x prompt table, per-subject and aggregate tables (with the student-minus-supervisor delta), grids and
    a bar chart, all logged to one MLflow run."""
    if not results:
        raise ProxytuneError(f"benchmark: every subject failed ({'; '.join(failures.values())})")
    with tempfile.TemporaryDirectory(prefix="proxytune-subjects-") as into:
        # in subject order, not the order workers finished in: the report is the same for any number of workers
        return _report(_download(dict(sorted(results.items())), Path(into)), failures, Path(out), label)


def _report(results: list[dict], failures: dict[str, str], out: Path, label: str) -> dict[str, str]:
    table = pd.concat([pd.read_csv(r["table"]) for r in results], ignore_index=True)
    pres = {r["subject"]: json.loads(Path(r["metrics"]).read_text()) for r in results}
    per_subject = reports.aggregate(table, by=("subject", "method"))
    if any("pres" in m.get("student", {}) for m in pres.values()):  # PRES is per subject, not per prompt
        per_subject["pres"] = [pres[s][m].get("pres") for s, m in zip(per_subject["subject"], per_subject["method"])]
    summary = reports.aggregate(table)
    if "pres" in per_subject:
        summary["pres"] = summary["method"].map(per_subject.groupby("method")["pres"].mean())
    summary = reports.with_delta(summary)
    paper = reports.paper_table(summary)
    cache = [json.loads(Path(r["cache"]).read_text()) for r in results]
    stats = {"hits": sum(c["hits"] for c in cache), "misses": sum(c["misses"] for c in cache)}

    with atomic_dir(out) as tmp:
        table.to_csv(tmp / "scores.csv", index=False)
        per_subject.to_csv(tmp / "subjects.csv", index=False)
        summary.to_csv(tmp / "aggregate.csv", index=False)
        atomic_write_text(tmp / "aggregate.md", reports.to_markdown(paper))
        atomic_write_text(tmp / "failures.json", json.dumps(failures, indent=2, sort_keys=True))
        atomic_write_text(tmp / CACHE_STATS_FILE, json.dumps(stats))
        (tmp / "grids").mkdir()
        for r in results:
            shutil.copyfile(r["grid"], tmp / "grids" / f"{r['subject']}.png")
        reports.bar_chart(paper[paper["Method"] != reports.DELTA], tmp / "aggregate.png")

    mlflow, _, exp_id = tracking.setup()  # the project's store and experiment, as the stages use
    tags = {"proxytune.benchmark": "true", "subjects": ",".join(r["subject"] for r in results),
            "failed": ",".join(failures)}
    with mlflow.start_run(experiment_id=exp_id, run_name=label, tags=tags):
        log = tracking.StageLogger(mlflow)
        for row in summary.itertuples(index=False):
            name = "delta" if row.method == reports.DELTA else row.method
            log.metrics({f"{name}.{m}": getattr(row, m) for m in reports.METRICS if m in summary})
        for row in per_subject.itertuples(index=False):
            log.metrics({f"{row.subject}.{row.method}.{m}": getattr(row, m) for m in reports.METRICS
                         if m in per_subject and pd.notna(getattr(row, m))})
        log.metrics({"subjects": len(results), "failed_subjects": len(failures),
                     **{f"embedding_cache.{k}": v for k, v in stats.items()}})
        for name in ("scores.csv", "subjects.csv", "aggregate.csv", "aggregate.md", "failures.json"):
            log.artifact(out / name, "tables")
        log.artifact(out / "aggregate.png", "plots")
        log.artifact(out / "grids", "grids")
    return {"table": str(out / "scores.csv"), "aggregate": str(out / "aggregate.csv"),
            "markdown": str(out / "aggregate.md"), "grids": str(out / "grids")}

"""One benchmark subject: the whole pipeline in its own work folder and process; then the cross-subject report.

Each subject gets `runs/<name>/` holding its own params.yaml (the project's, with the subject swapped in) and
every stage's data, laid out as in dvc.yaml (`python -m flows.pipeline --under runs/<name>`); the code and the
models stay in the project. A process per subject: one that crashes or exhausts memory takes only itself down.
Each work folder keeps its own MLflow store (a subject's pipeline run, models and registry stay with its data);
the benchmark's own run in the project's store carries every subject's scores and the aggregate.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml
from prefect import task
from prefect.cache_policies import CachePolicy

from orchestration import tracking
from orchestration.cache import stage_paths
from proxytune import reports
from proxytune.dreambench import Subject
from proxytune.io import atomic_dir, atomic_write_text, sha256_json, sha256_tree
from proxytune.params import ProxytuneError
from proxytune.reports import CACHE_STATS_FILE, TABLE_FILE

RUNS = Path("runs")
CODE = ["dvc.yaml", "tasks", "proxytune", "ar_models", "testbed", "flows", "models"]  # what every subject's results depend on
STAGES = ["prepare", "supervise", "synthesize", "distill", "evaluate"]  # bootstrap runs once, in the project
STAMP = ".proxytune/benchmark.json"


def subject_params(base: dict, subject: Subject) -> dict:
    """The project's params with `subject` swapped in and DreamBench's prompts for its kind (live/object)."""
    params = copy.deepcopy(base)
    params["subject"] = {**params["subject"], "name": subject.name, "images": str(subject.images.resolve()),
                         "class_noun": subject.class_noun}
    params["evaluate"] = {**params["evaluate"], "prompts": list(subject.templates)}
    return params


def subject_key(root: Path, params: dict) -> str:
    """Everything a subject's results depend on: its params (images, class, prompts, all settings), the
    contents of its photos, the code and the models. Content hashes are memoised per process."""
    code = {name: sha256_tree(root / name) for name in CODE if (root / name).exists()}
    return sha256_json({"params": params, "images": sha256_tree(params["subject"]["images"]), "code": code})


def _outputs(root: Path, work: Path) -> dict[str, Path]:
    evaluate = stage_paths("evaluate", work, root)
    return {"metrics": evaluate["metrics"], "table": evaluate["out"] / TABLE_FILE,
            "grid": evaluate["out"] / "grid.png", "cache": evaluate["out"] / CACHE_STATS_FILE}


def is_current(root: Path, under: str | Path, params: dict) -> bool:
    """Whether `runs/<name>/` below `under` still holds the results of a run with exactly these inputs."""
    work = Path(under) / RUNS / params["subject"]["name"]
    stamp = work / STAMP
    if not stamp.is_file() or not all(p.is_file() for p in _outputs(root, work).values()):
        return False
    recorded = json.loads(stamp.read_text())
    outputs = {k: sha256_tree(p) for k, p in _outputs(root, work).items()}
    return recorded == {"key": subject_key(root, params), "outputs": outputs}


def _work_dir(under: Path, params: dict) -> Path:
    work = under / RUNS / params["subject"]["name"]
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / "params.yaml", yaml.safe_dump(params, sort_keys=False))
    return work


def _prefect_api_url() -> str | None:
    """The API this process talks to, so child pipelines report there instead of each starting a server."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return PREFECT_API_URL.value()
    from prefect.server.api.server import SubprocessASGIServer  # the ephemeral server, a per-port singleton

    server = SubprocessASGIServer()
    return server.api_url if server.running else None


class SubjectCache(CachePolicy):
    """Keyed on `subject_key`: a subject re-runs when its photos, params, code or models change, alone."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        # where the run keeps its data is part of the result (its paths), so part of the key
        return "subject-" + sha256_json([subject_key(Path(inputs["root"]), inputs["params"]), inputs["under"]])


@task(name="subject", cache_policy=SubjectCache(), persist_result=True, result_serializer="json",
      task_run_name="subject-{params[subject][name]}")
def run_subject(root: str, under: str, params: dict) -> dict[str, str]:
    """Run prepare..evaluate for one subject of the project `root`, its data in `runs/<name>/` below `under`;
    return its result files (paths)."""
    root = Path(root)
    work = _work_dir(Path(under), params)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "PROXYTUNE_CACHE": os.environ.get("PROXYTUNE_CACHE", str(root / ".proxytune" / "cache"))}
    if api := _prefect_api_url():
        env["PREFECT_API_URL"] = api
    cmd = [sys.executable, "-m", "flows.pipeline", "--params", str(work / "params.yaml"), "--under", str(work),
           *(a for s in STAGES for a in ("--stage", s))]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    (work / "pipeline.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        why = errors[-1] if errors else f"exit status {proc.returncode}"
        raise ProxytuneError(f"subject {params['subject']['name']}: {why} (log: {work / 'pipeline.log'})")
    outputs = _outputs(root, work)
    stamp = {"key": subject_key(root, params), "outputs": {k: sha256_tree(p) for k, p in outputs.items()}}
    atomic_write_text(work / STAMP, json.dumps(stamp))
    return {"subject": params["subject"]["name"], **{k: str(p) for k, p in outputs.items()}}


@task(name="aggregate")
def aggregate(results: list[dict[str, str]], failures: dict[str, str], out: str, label: str) -> dict[str, str]:
    """The cross-subject report in `out`: per subject x prompt table, per-subject and aggregate tables (with
    the student-minus-supervisor delta), grids and a bar chart, all logged to one MLflow run."""
    if not results:
        raise ProxytuneError(f"benchmark: every subject failed ({'; '.join(failures.values())})")
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

    out = Path(out)
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

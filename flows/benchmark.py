"""The DreamBench benchmark: the pipeline for many subjects, each a flow run of a deployment on a work pool.

Wiring only (logic: `orchestration/benchmark.py`, `orchestration/pool.py`, `proxytune/dreambench.py`). `bootstrap`
runs once in the project; then each subject is a run of the `proxytune-subject/benchmark` deployment, picked up by
a worker of the pool, its data in `runs/<name>/`; the benchmark run lists them as subflows, waits, and aggregates
those that completed (their results read from MLflow) into `outputs/benchmark/` and one MLflow run. A failed
subject is retried (SUBJECT_RETRIES), then reported and left out; one whose worker died is marked Crashed and
runs again, from its stages' caches and checkpoints, in the next benchmark.

    python -m flows.benchmark ../shared/dreambench --workers 2     # a server if none runs, a pool, 2 workers
    python -m flows.benchmark ../shared/dreambench --subject dog --subject can --workers 0   # the pool's own workers
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from prefect import flow

from flows.pipeline import pipeline
from orchestration import pool as pools
from orchestration import server
from orchestration.benchmark import (
    STAGES,
    aggregate,
    collect,
    crash_orphans,
    record_subject,
    start_subjects,
    subject_params,
)
from orchestration.runlock import WAIT_ENV, run_lock
from orchestration.stage import is_current as stage_is_current
from orchestration.stage import resolve_paths, written_places
from proxytune.dreambench import load_dreambench
from proxytune.params import ProxytuneError, load_params
from tasks import STAGE_TASKS

OUT = "outputs/benchmark"
SUBJECT_RETRIES = 1  # a subject failing for a passing reason (memory, a lost file) gets one more try


@flow(name="proxytune-subject", flow_run_name="subject-{name}", retries=SUBJECT_RETRIES)
def subject(name: str, params_file: str, under: str) -> str:
    """One benchmark subject: prepare..evaluate below `under`, then its results logged to MLflow (the run id)."""
    state = pipeline(params_file=params_file, stages=STAGES, under=under, return_state=True)
    if state.is_failed():
        raise ProxytuneError(f"subject {name}: {state.message}")
    stages = state.result()
    return record_subject(name, stages["evaluate"]["outputs"], all(s["cached"] for s in stages.values()))


def deploy(project: Path, pool: str) -> None:
    """The subject deployment on `pool`, its code the project folder (each worker runs it from there)."""
    pools.ensure_pool(pool)
    subject.from_source(str(project), entrypoint="flows/benchmark.py:subject").deploy(
        "benchmark", work_pool_name=pool, tags=["proxytune"], print_next_steps=False, ignore_warnings=True)


@flow(name="proxytune-benchmark")
def benchmark(dataset: str, subjects: list[str] | None = None, params_file: str = "params.yaml",
              out: str | None = None, under: str = ".", wait: float | None = None, pool: str = pools.POOL) -> dict:
    """Run every subject (None: all under `dataset`) on the work pool `pool`, then aggregate those that succeeded.
    The data (bootstrap's models, `runs/<subject>/`, the report: `out`, default OUT) goes below `under`, a folder
    every worker sees; the code is the cwd's project. Another benchmark writing the same models or report stops
    this one, or is waited for up to `wait` seconds (each subject's pipeline holds its own outputs).

    Returns the report's paths plus, per subject, whether all its stages came from cache or it failed (why).
    """
    with run_lock(_written(out, under), wait):
        return _benchmark(dataset, subjects, params_file, out, under, pool)


def _benchmark(dataset: str, subjects: list[str] | None, params_file: str, out: str | None, under: str,
               pool: str) -> dict:
    under = str(Path(under).resolve())
    base = load_params(params_file)
    chosen = load_dreambench(dataset, subjects)
    paths = {name: str(path) for name, path in resolve_paths("bootstrap", under=under).items()}
    boot = STAGE_TASKS["bootstrap"].with_options(refresh_cache=not stage_is_current("bootstrap", params_file, paths))
    if boot(params_file, paths, return_state=True).is_failed():
        raise ProxytuneError("benchmark: bootstrap failed")
    deploy(Path.cwd(), pool)
    crash_orphans(pool)  # runs a killed worker left Running are Crashed before their subjects run again
    runs = collect(start_subjects([subject_params(base, s) for s in chosen], under), pool)
    report = aggregate(runs["results"], runs["failed"], out or str(Path(under) / OUT),
                       label=f"benchmark-{Path(dataset).name}-{len(chosen)}")
    return {"report": report, "failed": runs["failed"],
            "subjects": {s.name: {"cached": runs["cached"].get(s.name, False), "failed": s.name in runs["failed"]}
                         for s in chosen}}


def _written(out: str | None, under: str) -> list[Path]:
    """What the benchmark itself writes: bootstrap's models and the report."""
    return [*written_places(["bootstrap"], under), Path(out or Path(under) / OUT)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="folder laid out like google/dreambooth's dataset/")
    parser.add_argument("--subject", action="append", help="only this subject (repeatable; default: all)")
    parser.add_argument("--params", default="params.yaml", help="base params file (default: params.yaml)")
    parser.add_argument("--out", help=f"report folder (default: {OUT} below --under)")
    parser.add_argument("--under", default=".", help="keep the subjects' runs and the report below this folder, "
                                                     "one every worker sees (default: the project)")
    parser.add_argument("--pool", default=pools.POOL, help=f"the work pool running the subjects (default: {pools.POOL})")
    parser.add_argument("--workers", type=int, default=1,
                        help="workers started here for the run, then stopped (default: 1; 0: the pool has its own)")
    parser.add_argument("--wait", type=float, metavar="SECONDS",
                        help=f"if another benchmark is writing the same models or report, wait up to SECONDS for "
                             f"it (default: ${WAIT_ENV}, else stop at once)")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as hold:
        try:
            load_params(args.params)
            load_dreambench(args.dataset, args.subject)
            hold.enter_context(run_lock(_written(args.out, args.under), args.wait))  # before Prefect starts
            api = hold.enter_context(server.started())
        except ProxytuneError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        pools.ensure_pool(args.pool)
        hold.enter_context(pools.local_workers(args.pool, args.workers, api, server.home() / "workers"))
        state = benchmark(args.dataset, args.subject, args.params, args.out, args.under, args.wait, args.pool,
                          return_state=True)
    if state.is_failed():
        print(f"error: {state.message}", file=sys.stderr)
        return 2
    result = state.result()
    for name, s in result["subjects"].items():
        print(f"{name:<20} {'FAILED: ' + result['failed'][name] if s['failed'] else 'cached' if s['cached'] else 'ran'}")
    print(Path(result["report"]["markdown"]).read_text())
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

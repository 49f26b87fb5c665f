"""The DreamBench benchmark: the pipeline for many subjects, one mapped (and separately cached) task each.

Wiring only (logic: `orchestration/benchmark.py`, `proxytune/dreambench.py`). `bootstrap` runs once in the project;
then every subject runs in `runs/<name>/`; a failed subject is reported and left out while the others are
aggregated into `outputs/benchmark/` and one MLflow run.

    python -m flows.benchmark ../shared/dreambench                 # every subject the folder holds
    python -m flows.benchmark ../shared/dreambench --subject dog --subject can --workers 2
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from prefect import flow, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from orchestration.benchmark import aggregate, is_current, run_subject, subject_params
from orchestration.runlock import WAIT_ENV, run_lock
from orchestration.stage import is_current as stage_is_current
from orchestration.stage import resolve_paths, written_places
from proxytune.dreambench import load_dreambench
from proxytune.params import ProxytuneError, load_params
from tasks.bootstrap import bootstrap_task

OUT = "outputs/benchmark"


@flow(name="proxytune-benchmark", task_runner=ThreadPoolTaskRunner(max_workers=1))
def benchmark(dataset: str, subjects: list[str] | None = None, params_file: str = "params.yaml",
              out: str | None = None, under: str = ".", wait: float | None = None) -> dict:
    """Run every subject (None: all under `dataset`), then aggregate those that succeeded. The data (bootstrap's
    models, `runs/<subject>/`, the report: `out`, default OUT) goes below `under`; the code is the cwd's project.
    Another benchmark writing the same models or report stops this one, or is waited for up to `wait` seconds
    (each subject's pipeline holds its own outputs).

    Returns the report's paths plus, per subject, whether it came from cache or failed (with the reason).
    """
    with run_lock(_written(out, under), wait):
        return _benchmark(dataset, subjects, params_file, out, under)


def _benchmark(dataset: str, subjects: list[str] | None, params_file: str, out: str | None, under: str) -> dict:
    root, under = Path.cwd(), str(Path(under).resolve())
    base = load_params(params_file)
    chosen = load_dreambench(dataset, subjects)
    paths = {name: str(path) for name, path in resolve_paths("bootstrap", under=under).items()}
    boot = bootstrap_task.with_options(refresh_cache=not stage_is_current("bootstrap", params_file, paths))
    if boot(params_file, paths, return_state=True).is_failed():
        raise ProxytuneError("benchmark: bootstrap failed")
    params = [subject_params(base, s) for s in chosen]
    # A subject whose run folder no longer matches its inputs must not be served from Prefect's cache.
    states = {}
    for refresh in (False, True):
        group = [p for p in params if is_current(root, under, p) != refresh]
        if group:
            futures = run_subject.with_options(refresh_cache=refresh).map(unmapped(str(root)), unmapped(under), group)
            for p, future in zip(group, futures):
                future.wait()
                states[p["subject"]["name"]] = future.state
    results = [s.result() for s in states.values() if s.is_completed()]
    failures = {name: str(s.result(raise_on_failure=False)) for name, s in states.items() if not s.is_completed()}
    report = aggregate(results, failures, out or str(Path(under) / OUT), label=f"benchmark-{Path(dataset).name}-{len(chosen)}")
    return {"report": report, "failed": failures,
            "subjects": {name: {"cached": s.name == "Cached", "failed": not s.is_completed()}
                         for name, s in states.items()}}


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
    parser.add_argument("--under", default=".", help="keep the subjects' runs and the report below this folder")
    parser.add_argument("--workers", type=int, default=1, help="subjects run at once (default: 1)")
    parser.add_argument("--wait", type=float, metavar="SECONDS",
                        help=f"if another benchmark is writing the same models or report, wait up to SECONDS for "
                             f"it (default: ${WAIT_ENV}, else stop at once)")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as hold:
        try:
            load_params(args.params)
            load_dreambench(args.dataset, args.subject)
            hold.enter_context(run_lock(_written(args.out, args.under), args.wait))  # before Prefect starts
        except ProxytuneError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        runner = benchmark.with_options(task_runner=ThreadPoolTaskRunner(max_workers=max(1, args.workers)))
        state = runner(args.dataset, args.subject, args.params, args.out, args.under, args.wait, return_state=True)
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

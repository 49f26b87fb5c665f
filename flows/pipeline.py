"""The proxytune flow: bootstrap -> prepare -> supervise -> synthesize -> distill -> evaluate.

Wiring only. Each stage is a cached Prefect task (see `orchestration.stage`); `dvc repro` calls this module
once per stage with `--stage NAME` and the stage's paths (`--prepared outputs/prepare --out ...`, as dvc.yaml's
`cmd` lists them); a user can run the whole chain with no arguments, or keep its data in another folder
with `--under DIR`. Each invocation, or each `dvc repro`, is one MLflow parent run (`orchestration.tracking`).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import Failed

from orchestration import server, tracking
from orchestration.cache import check_path_params, stage_paths
from orchestration.overrides import Overrides, write_params
from orchestration.runlock import WAIT_ENV, run_lock
from orchestration.stage import is_current, resolve_paths, run_name, written_places
from proxytune.params import ProxytuneError, load_params
from tasks import STAGE_TASKS

STAGES = list(STAGE_TASKS)


def _run_name() -> str:
    parameters = flow_run.parameters
    return run_name(parameters.get("params_file", "params.yaml"), parameters.get("stages"),
                    parameters.get("overrides"))


@flow(name="proxytune", flow_run_name=_run_name)
def pipeline(params_file: str = "params.yaml", stages: list[str] | None = None, under: str = ".",
             paths: dict[str, str] | None = None, wait: float | None = None,
             overrides: Overrides | None = None) -> dict[str, dict]:
    """Run `stages` (None: all) in pipeline order, their data laid out as in dvc.yaml below `under`; `paths`
    names a single stage's paths explicitly. A stage whose outputs are stale refreshes its cache. Another run
    writing the same outputs stops this one, or is waited for up to `wait` seconds (`runlock.wait_seconds`).
    `overrides` replace params.yaml's values for this run (a new subject from the UI's Run form); the result
    is checked, with each stage's path params, before any stage starts.

    Returns, per stage, its output paths and whether Prefect served it from cache.
    """
    unknown = sorted(set(stages or []) - set(STAGES))
    if unknown:
        raise ProxytuneError(f"unknown stage(s) {', '.join(unknown)} (stages: {', '.join(STAGES)})")
    chosen = STAGES if stages is None else [s for s in STAGES if s in stages]
    if paths and len(chosen) != 1:
        raise ProxytuneError("explicit stage paths need exactly one --stage")
    try:
        params_file = write_params(params_file, overrides, Path(under) / ".proxytune" / "params")
        params = load_params(params_file)
        for stage in chosen:
            check_path_params(stage, params)
    except ProxytuneError as e:
        return Failed(message=str(e))
    results = {}
    with run_lock(written_places(chosen, under, paths), wait), tracking.pipeline_run():
        for stage in chosen:
            where = {k: str(v) for k, v in resolve_paths(stage, paths, under).items()}
            task = STAGE_TASKS[stage].with_options(refresh_cache=not is_current(stage, params_file, where))
            state = task(params_file, where, return_state=True)
            if state.is_failed():  # later stages read this one's outputs: stop here
                return Failed(message=f"stage {stage} failed: {state.message}")
            results[stage] = {"outputs": state.result(), "cached": state.name == "Cached"}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__)
    parser.add_argument("--stage", action="append", choices=STAGES, help="run only this stage (repeatable)")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--under", default=".", help="keep every stage's data below this folder (default: .)")
    parser.add_argument("--wait", type=float, metavar="SECONDS",
                        help=f"if another run is writing the same outputs, wait up to SECONDS for it "
                             f"(default: ${WAIT_ENV}, else stop at once)")
    args, rest = parser.parse_known_args(argv)
    with contextlib.ExitStack() as hold:
        try:
            paths = _path_flags(parser, rest, args.stage)
            params = load_params(args.params)  # fail fast, before Prefect starts, on a bad params file,
            for stage in args.stage or STAGES:  # a path param that names the wrong thing,
                check_path_params(stage, params)
            # and a busy output: the flow takes these locks again (a process holds each once)
            hold.enter_context(run_lock(written_places(args.stage or STAGES, args.under, paths), args.wait))
            # one server for every stage of a `dvc repro`: its first stage starts it, the others reuse it
            hold.enter_context(server.reused(start="DVC_STAGE" in os.environ))
        except ProxytuneError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        state = pipeline(params_file=args.params, stages=args.stage, under=args.under, paths=paths,
                         wait=args.wait, return_state=True)
    if state.is_failed():
        print(f"error: {state.message}", file=sys.stderr)
        return 2
    for stage, result in state.result().items():
        print(f"{stage:<11} {'cached' if result['cached'] else 'ran'}")
    return 0


def _path_flags(parser: argparse.ArgumentParser, rest: list[str], stages: list[str] | None) -> dict[str, str]:
    """A single stage's path arguments (`--loss-csv x.csv` -> {"loss_csv": "x.csv"}), as dvc.yaml names them."""
    if not rest:
        return {}
    if not stages or len(stages) != 1:
        parser.error(f"unrecognized arguments: {' '.join(rest)} (path arguments need exactly one --stage)")
    flags = argparse.ArgumentParser(prog=f"{parser.prog} --stage {stages[0]}")
    for name in stage_paths(stages[0]):
        flags.add_argument(f"--{name.replace('_', '-')}", dest=name)
    return {name: value for name, value in vars(flags.parse_args(rest)).items() if value is not None}


if __name__ == "__main__":
    sys.exit(main())

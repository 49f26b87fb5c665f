"""The proxytune flow: bootstrap -> prepare -> supervise -> synthesize -> distill -> evaluate.

Wiring only. Each stage is a cached Prefect task (see `proxytune.stage`); `dvc repro` calls this module
once per stage with `--stage NAME`, and a user can run the whole chain with no arguments.
"""
from __future__ import annotations

import argparse
import sys

from prefect import flow
from prefect.states import Failed

from proxytune.params import ProxytuneError, load_params
from proxytune.stage import is_current
from tasks.bootstrap import bootstrap_task
from tasks.distill import distill_task
from tasks.evaluate import evaluate_task
from tasks.prepare import prepare_task
from tasks.supervise import supervise_task
from tasks.synthesize import synthesize_task

TASKS = {
    "bootstrap": bootstrap_task,
    "prepare": prepare_task,
    "supervise": supervise_task,
    "synthesize": synthesize_task,
    "distill": distill_task,
    "evaluate": evaluate_task,
}
STAGES = list(TASKS)


@flow(name="proxytune")
def pipeline(params_file: str = "params.yaml", stages: list[str] | None = None) -> dict[str, dict]:
    """Run `stages` (None: all) in pipeline order; a stage whose outputs are stale refreshes its cache.

    Returns, per stage, its output paths and whether Prefect served it from cache.
    """
    unknown = sorted(set(stages or []) - set(STAGES))
    if unknown:
        raise ProxytuneError(f"unknown stage(s) {', '.join(unknown)} (stages: {', '.join(STAGES)})")
    results = {}
    for stage in STAGES if stages is None else [s for s in STAGES if s in stages]:
        task = TASKS[stage].with_options(refresh_cache=not is_current(stage, params_file))
        state = task(params_file, return_state=True)
        if state.is_failed():  # later stages read this one's outputs: stop here
            return Failed(message=f"stage {stage} failed: {state.message}")
        results[stage] = {"outputs": state.result(), "cached": state.name == "Cached"}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__)
    parser.add_argument("--stage", action="append", choices=STAGES, help="run only this stage (repeatable)")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        load_params(args.params)  # fail fast, before Prefect starts, on a bad params file
    except ProxytuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state = pipeline(params_file=args.params, stages=args.stage, return_state=True)
    if state.is_failed():
        print(f"error: {state.message}", file=sys.stderr)
        return 2
    for stage, result in state.result().items():
        print(f"{stage:<11} {'cached' if result['cached'] else 'ran'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

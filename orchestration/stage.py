"""Turns a stage's plain `run(params, log, paths)` function into a cached Prefect task.

The cache key is `cache.stage_key` (contents of the deps and values of the params `dvc.yaml`
declares for the stage), so Prefect's cache and DVC's agree on when a stage is stale. Tasks take and
return file paths only: `paths` maps the stage's path arguments (dvc.yaml's `cmd` names them) to places.
"""
from __future__ import annotations

import argparse
import sys
from importlib import import_module
from pathlib import Path
from typing import Callable

from prefect import get_run_logger, task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.logging.handlers import APILogWorker
from prefect.states import Failed

from orchestration import artifacts, tracking
from orchestration.cache import (
    output_names,
    outputs_current,
    path_arguments,
    stage_key,
    stage_paths,
    stage_spec,
    write_stamp,
)
from orchestration.overrides import effective_params
from proxytune import progress
from proxytune.io import sha256_json
from proxytune.params import ProxytuneError, get, load_params

RunFn = Callable[[dict, "tracking.StageLogger", dict[str, Path]], dict]


class StageCache(CachePolicy):
    """Prefect cache policy keyed on a stage's declared inputs (see `orchestration.cache`)."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        paths = resolve_paths(self.stage, inputs.get("paths"))
        return f"{self.stage}-{stage_key(self.stage, load_params(inputs['params_file']), paths)}"


def resolve_paths(stage: str, given: dict[str, str | Path] | None = None, under: str | Path = ".") -> dict[str, Path]:
    """The stage's paths: dvc.yaml's layout below `under`, with any of them given explicitly."""
    paths = stage_paths(stage, under)
    unknown = sorted(set(given or {}) - set(paths))
    if unknown:
        raise ProxytuneError(f"stage {stage}: unknown path argument(s) {', '.join(unknown)} "
                             f"(it takes: {', '.join(path_arguments(stage))})")
    return {**paths, **{name: Path(value) for name, value in (given or {}).items()}}


def written_places(stages: list[str], under: str | Path = ".", given: dict[str, str | Path] | None = None) -> list[Path]:
    """Where running `stages` writes (their dvc.yaml outs, metrics and plots): what a run's lock covers."""
    return [path for stage in stages for name, path in resolve_paths(stage, given, under).items()
            if name in output_names(stage)]


def launched_stage_args(stage: str, argv: list[str] | None = None) -> tuple[str, dict[str, Path]]:
    """`--params FILE` and the stage's path flags, for a stage's own entry point (`accelerate launch -m tasks.X`)."""
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{stage}")
    parser.add_argument("--params", default="params.yaml")
    for name in stage_paths(stage):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name)
    args = vars(parser.parse_args(argv))
    params_file = args.pop("params")
    return params_file, resolve_paths(stage, {k: v for k, v in args.items() if v is not None})


def stage_params(stage: str, params: dict) -> dict:
    """The subset of params.yaml this stage declares in dvc.yaml (what it logs to MLflow)."""
    names = [n if isinstance(n, str) else next(iter(n)) for n in stage_spec(stage).get("params", [])]
    return {name: get(params, name) for name in names}


def bad_input_errors() -> tuple[type[Exception], ...]:
    """The errors that mean bad input, not a bug: ours, and `ar_models`' when a stage has loaded it. A stage that
    never imported `ar_models` cannot have raised its error, so this never imports it (and torch) to catch one."""
    ar_models = sys.modules.get("ar_models")
    return (ProxytuneError, ar_models.ModelConfigError) if ar_models else (ProxytuneError,)


def stage_task(stage: str, module: str, model_role: str | None = None):
    """The Prefect task for `stage`, which runs `module`'s `run` (a RunFn); it stamps outputs so later cache hits
    are checked, follows the stage's loops in a progress artifact and publishes what the stage wrote as artifacts
    (`orchestration.artifacts`). With `model_role`, the stage's `out` folder is also logged and registered as that
    MLflow model (`orchestration.registry`). `module` is imported when the task first runs, not on a cache hit."""

    def execute(params_file: str = "params.yaml", paths: dict[str, str] | None = None):
        run: RunFn = import_module(module).run
        try:
            params = load_params(params_file)
            where = resolve_paths(stage, paths)
            key = stage_key(stage, params, where)
            shown = artifacts.ProgressArtifact(stage, params)
            with tracking.stage_run(stage, params, stage_params(stage, params)) as log, progress.reporting(shown):
                outputs = run(params, log, where)
                if model_role:
                    log.model(model_role, where["out"], params)
        except bad_input_errors() as e:
            # Bad input, not a bug: one clear line instead of a traceback.
            get_run_logger().error(str(e))
            return Failed(message=str(e))
        write_stamp(stage, key, where)
        artifacts.publish(stage, params, outputs)
        shown.finish()
        APILogWorker.drain_all(timeout=30)  # the stage's step logs reach the UI before its run ends, not after
        return outputs

    def republish_cached(task, task_run, state) -> None:
        """A run served from cache shows the artifacts of the outputs it returns, like one that computed them."""
        if state.name == "Cached":
            artifacts.publish(stage, load_params(TaskRunContext.get().parameters["params_file"]), state.result())

    execute.__name__ = stage
    return task(
        name=stage, cache_policy=StageCache(stage), persist_result=True, result_serializer="json",
        on_completion=[republish_cached],
    )(execute)


def run_name(params_file: str, stages: list[str] | None, overrides=None) -> str:
    """`<stages> · <subject> · <params hash>`, what a flow run does, as its name in the UI's runs list. The hash
    (of the params with any `overrides`) is MLflow's `params.sha256` tag of the same run, so the two match."""
    what = "+".join(stages) if stages else "all stages"
    try:
        params = effective_params(params_file, overrides)
    except ProxytuneError:
        return f"{what} · bad params"  # the run itself says why, in one line
    return f"{what} · {get(params, 'subject.name')} · {sha256_json(params)[:8]}"


def is_current(stage: str, params_file: str = "params.yaml", paths: dict[str, str] | None = None) -> bool:
    """Whether the stage's outputs on disk still match its inputs (else its cache must be refreshed)."""
    where = resolve_paths(stage, paths)
    return outputs_current(stage, stage_key(stage, load_params(params_file), where), where)

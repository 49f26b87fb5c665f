"""Turns a stage's plain `run(params, log)` function into a cached Prefect task.

The cache key is `cache.stage_key` (contents of the deps and values of the params `dvc.yaml`
declares for the stage), so Prefect's cache and DVC's agree on when a stage is stale. Tasks take and
return file paths only.
"""
from __future__ import annotations

from typing import Callable

from prefect import get_run_logger, task
from prefect.cache_policies import CachePolicy
from prefect.states import Failed

from ar_models import ModelConfigError
from proxytune import tracking
from proxytune.cache import outputs_current, stage_key, stage_spec, write_stamp
from proxytune.params import ProxytuneError, get, load_params

RunFn = Callable[[dict, "tracking.StageLogger"], dict]


class StageCache(CachePolicy):
    """Prefect cache policy keyed on a stage's declared inputs (see `proxytune.cache`)."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        return f"{self.stage}-{stage_key(self.stage, load_params(inputs['params_file']))}"


def stage_params(stage: str, params: dict) -> dict:
    """The subset of params.yaml this stage declares in dvc.yaml (what it logs to MLflow)."""
    names = [n if isinstance(n, str) else next(iter(n)) for n in stage_spec(stage).get("params", [])]
    return {name: get(params, name) for name in names}


def stage_task(stage: str, run: RunFn):
    """Wrap `run` as the Prefect task for `stage`; it stamps outputs so later cache hits are checked."""

    def execute(params_file: str = "params.yaml"):
        try:
            params = load_params(params_file)
            key = stage_key(stage, params)
            with tracking.stage_run(stage, params, stage_params(stage, params)) as log:
                outputs = run(params, log)
        except (ProxytuneError, ModelConfigError) as e:
            # Bad input, not a bug: one clear line instead of a traceback.
            get_run_logger().error(str(e))
            return Failed(message=str(e))
        write_stamp(stage, key)
        return outputs

    execute.__name__ = stage
    execute.__doc__ = run.__doc__
    return task(
        name=stage, cache_policy=StageCache(stage), persist_result=True, result_serializer="json",
    )(execute)


def is_current(stage: str, params_file: str = "params.yaml") -> bool:
    """Whether the stage's outputs on disk still match its inputs (else its cache must be refreshed)."""
    return outputs_current(stage, stage_key(stage, load_params(params_file)))

"""One module per pipeline stage, each with its `run(params, log, paths)`; here, the stages as cached Prefect tasks.

A task imports its stage's module only when the stage really runs, so a stage Prefect serves from cache never
loads torch, diffusers or the models (its process starts in about a third of the time).
"""
import orchestration  # noqa: F401  (project-local Prefect settings, before any module imports prefect)
from orchestration.stage import stage_task

# pipeline order; the role is the MLflow model a stage's `out` folder is registered as
STAGE_TASKS = {
    "bootstrap": stage_task("bootstrap", "tasks.bootstrap"),
    "prepare": stage_task("prepare", "tasks.prepare"),
    "supervise": stage_task("supervise", "tasks.supervise", model_role="supervisor"),
    "synthesize": stage_task("synthesize", "tasks.synthesize"),
    "distill": stage_task("distill", "tasks.distill", model_role="student"),
    "evaluate": stage_task("evaluate", "tasks.evaluate"),
}

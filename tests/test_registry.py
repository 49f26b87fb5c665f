"""The tuned student as a registered MLflow model: loaded from the registry, it draws what `load_tuned` draws."""
from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd

from flows.pipeline import pipeline
from orchestration import registry, tracking
from proxytune.evaluation import supervisor_samples
from proxytune.images import to_pil
from proxytune.params import load_params
from proxytune.tuning import load_tuned

PROMPTS = ["a sks toy on the beach", "a sks toy in the snow"]


def test_registered_student_draws_what_load_tuned_draws(synthesized):
    pipeline(params_file=str(synthesized / "params.yaml"), stages=["distill"], under=str(synthesized))
    params = load_params(synthesized / "params.yaml")
    mlflow.set_tracking_uri(tracking.tracking_uri())
    name = registry.registered_name("student", params["subject"]["name"])

    model = mlflow.pyfunc.load_model(f"models:/{name}/latest")
    drawn = model.predict(pd.DataFrame({"prompt": PROMPTS}), params={"seed": 3})
    expected = to_pil(load_tuned(synthesized / "outputs/distill", params["student"]).generate(PROMPTS, seed=3))
    assert drawn.dtype == np.uint8 and drawn.shape[0] == len(PROMPTS)
    np.testing.assert_array_equal(drawn, np.stack([np.asarray(img) for img in expected]))

    # the stage run's plain artifacts are a complete adapter folder too
    (version,) = mlflow.MlflowClient().search_model_versions(f"name = '{name}'")
    downloaded = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="student")
    assert load_tuned(downloaded, params["student"]).generate(PROMPTS[:1], seed=3).shape[0] == 1
    parent = mlflow.get_run(mlflow.get_run(version.run_id).data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED" and "distill.loss" in parent.data.metrics


def test_registered_supervisor_draws_what_the_evaluate_stage_draws(synthesized):
    params = load_params(synthesized / "params.yaml")
    with tracking.stage_run("supervise", params, {}) as log:
        log.model("supervisor", synthesized / "outputs/supervise", params)
    name = registry.registered_name("supervisor", params["subject"]["name"])

    model = mlflow.pyfunc.load_model(f"models:/{name}/latest")
    seed = int(params["seed"]) * 7919  # the evaluate stage's first seed
    drawn = model.predict(pd.DataFrame({"prompt": PROMPTS[:1]}), params={"seed": seed})
    expected = supervisor_samples(params, PROMPTS[:1], synthesized / "outputs/supervise")
    np.testing.assert_array_equal(drawn, np.stack([np.asarray(img) for img in expected]))

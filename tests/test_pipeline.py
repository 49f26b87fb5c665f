"""End to end: the Prefect flow runs every stage, then serves everything from cache on a re-run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pytest
from conftest import edit_params

from flows.pipeline import main, pipeline

AFTER_BOOTSTRAP = ["prepare", "supervise", "synthesize", "distill", "evaluate"]


def test_pipeline_runs_then_caches_and_recomputes_only_what_changed(project):
    run = {"params_file": str(project / "params.yaml"), "under": str(project)}
    first = pipeline(stages=AFTER_BOOTSTRAP, **run)
    assert [s for s, r in first.items() if r["cached"]] == []

    scores = json.loads((project / "outputs/metrics.json").read_text())
    for model in ("student", "supervisor"):
        assert set(scores[model]) == {"dino", "clip_i", "clip_t"}
        assert all(-1.0 <= v <= 1.0 for v in scores[model].values())
    assert (project / "outputs/evaluate/grid.png").is_file()
    assert (project / "outputs/supervise/pytorch_lora_weights.safetensors").is_file()
    assert (project / "outputs/distill/adapter/adapter_model.safetensors").is_file()
    _check_mlflow_runs()
    lora_mtime = (project / "outputs/supervise/pytorch_lora_weights.safetensors").stat().st_mtime_ns

    second = pipeline(stages=AFTER_BOOTSTRAP, **run)
    assert all(r["cached"] for r in second.values()), second
    assert (project / "outputs/supervise/pytorch_lora_weights.safetensors").stat().st_mtime_ns == lora_mtime

    edit_params(project, "student", learning_rate=5.0e-3)
    third = pipeline(stages=AFTER_BOOTSTRAP, **run)
    assert {s: r["cached"] for s, r in third.items()} == {
        "prepare": True, "supervise": True, "synthesize": True, "distill": False, "evaluate": False}

    # A deleted output is never papered over by a cache hit.
    (project / "outputs/metrics.json").unlink()
    fourth = pipeline(stages=["evaluate"], **run)
    assert fourth["evaluate"]["cached"] is False
    assert (project / "outputs/metrics.json").is_file()


def _check_mlflow_runs():
    """One parent run for the pipeline run, one nested run per stage, with losses, metrics and grids."""
    runs = mlflow.search_runs(experiment_names=["proxytune"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("proxytune.pipeline") == "true"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {"student.dino", "supervisor.dino", "distill.loss"} <= set(parents[0].data.metrics)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["stage"] for r in children) == sorted(AFTER_BOOTSTRAP)
    by_stage = {r.data.tags["stage"]: r for r in children}
    for run in children:
        assert run.data.tags["prefect.flow_run_id"] not in ("", "none")
        assert "git.commit" in run.data.tags
    assert "student.dino" in by_stage["evaluate"].data.metrics
    assert "loss" in by_stage["distill"].data.metrics
    history = mlflow.MlflowClient().get_metric_history(by_stage["supervise"].info.run_id, "loss")
    assert len(history) == 4  # FAST sets supervisor.steps = 4: one point per step
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(by_stage["evaluate"].info.run_id, "grids")]
    assert artifacts == ["grids/grid.png"]


def test_cli_reports_bad_params_in_one_line(project, capsys):
    edit_params(project, "subject", name="../x")
    assert main(["--params", str(project / "params.yaml"), "--under", str(project)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: params: subject.name = '../x': ")


def test_bad_input_stops_the_flow_with_one_line_and_keeps_earlier_outputs(project, capsys):
    run = ["--params", str(project / "params.yaml"), "--under", str(project)]
    assert main([*run, "--stage", "prepare"]) == 0
    before = {p: p.read_bytes() for p in (project / "outputs/prepare").rglob("*") if p.is_file()}
    (project / "data/demo_subject/notes.txt").write_text("not a photo")

    assert main([*run, "--stage", "prepare", "--stage", "supervise"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    photo = project / "data/demo_subject/notes.txt"
    assert err[-1] == f"error: stage prepare failed: {photo}: not an image file PIL can read"
    assert {p: p.read_bytes() for p in (project / "outputs/prepare").rglob("*") if p.is_file()} == before
    assert not (project / "outputs/supervise").exists()


def test_prefect_records_stay_inside_the_project(tmp_path):
    """Database and cached task results default to <project>/.prefect for our entry points."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    code = ("import flows.pipeline; from prefect.settings import get_current_settings as s; "
            "print(s().home); print(s().results.local_storage_path)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(tmp_path / ".prefect"), str(tmp_path / ".prefect" / "storage")]


def test_one_stage_takes_its_paths_as_arguments(project, capsys):
    """As dvc.yaml's cmd passes them: the stage writes exactly where it is told."""
    out = project / "elsewhere" / "prepared"
    assert main(["--params", str(project / "params.yaml"), "--stage", "prepare", "--out", str(out)]) == 0
    assert (out / "captions.jsonl").is_file() and not (project / "outputs").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["--params", str(project / "params.yaml"), "--stage", "prepare", "--prepared", "x"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --prepared x" in capsys.readouterr().err

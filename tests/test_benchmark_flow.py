"""The multi-subject benchmark end to end on the four shared DreamBench subjects, at the tiniest settings."""
from __future__ import annotations

import json
import shutil

import mlflow
import pandas as pd
import pytest
import yaml
from conftest import REPO, paths
from PIL import Image

from flows.benchmark import benchmark
from orchestration import compare
from orchestration.cache import stage_key, write_stamp
from proxytune.params import load_params

SHARED = REPO.parent / "shared" / "dreambench"
SUBJECTS = ["backpack", "can", "cat", "dog"]
TINIEST = {
    "supervisor": {"steps": 1, "num_class_images": 1, "sample_steps": 1, "checkpoint_every": 0},
    "synthesize": {"num_images": 2, "sample_steps": 1, "batch_size": 2},
    "student": {"steps": 1, "batch_size": 2, "checkpoint_every": 0},
    "evaluate": {"prompts_per_model": 1, "images_per_prompt": 2, "pres_images": 1},
}


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/dreambench not present")
def test_four_subjects_run_cache_and_survive_a_failing_one(project, tmp_path, monkeypatch):
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in TINIEST.items():
        params[section].update(values)
    params_file = project / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    boot = paths(project, "bootstrap")  # models/ came from the session's bootstrap
    write_stamp("bootstrap", stage_key("bootstrap", load_params(params_file), boot), boot)
    out = project / "outputs/benchmark"
    run = {"params_file": str(params_file), "under": str(project)}
    dataset = tmp_path / "dreambench"
    shutil.copytree(SHARED, dataset)
    (dataset / "dog2").mkdir()  # listed in prompts_and_classes.txt; one photo is too few for `prepare`
    Image.new("RGB", (80, 80), "red").save(dataset / "dog2" / "00.jpg")

    first = benchmark(str(dataset), **run)
    assert sorted(first["subjects"]) == sorted([*SUBJECTS, "dog2"])
    assert list(first["failed"]) == ["dog2"] and "dog2" in first["failed"]["dog2"]
    assert "at least 2" in first["failed"]["dog2"]
    assert not any(s["cached"] for s in first["subjects"].values())

    table = pd.read_csv(out / "scores.csv")
    assert sorted(set(table["subject"])) == SUBJECTS and len(table) == len(SUBJECTS) * 2  # x 2 methods, 1 prompt
    assert set(table.loc[table["subject"] == "dog", "prompt"]) == {"a sks dog in the jungle"}
    assert set(table["clip_text"]) == {f"a {s} in the jungle" for s in SUBJECTS}
    assert (table["images"] == 2).all()
    # float64 written with repr and read back with the round-trip parser: the very values in memory
    summary = pd.read_csv(out / "aggregate.csv", float_precision="round_trip").set_index("method")
    assert list(summary.index) == ["student", "supervisor", "student - supervisor"]
    # the delta row is the same float64 subtraction of the same values: exactly equal
    assert summary.loc["student - supervisor", "dino"] == (
        summary.loc["student", "dino"] - summary.loc["supervisor", "dino"])
    assert summary[["dino", "clip_i", "clip_t", "pres"]].abs().le(1).all().all()
    assert (out / "aggregate.md").read_text().startswith("| Method | DINO | CLIP-I | CLIP-T | PRES |")
    assert sorted(p.name for p in (out / "grids").iterdir()) == [f"{s}.png" for s in SUBJECTS]
    assert json.loads((out / "failures.json").read_text()).keys() == {"dog2"}

    runs = mlflow.search_runs(experiment_names=["proxytune"], filter_string="tags.`proxytune.benchmark` = 'true'",
                              output_format="list")
    assert len(runs) == 1 and runs[0].data.tags["failed"] == "dog2"
    # MLflow's SQL store keeps metrics as float64 (Float(precision=53)): the same value as the CSV's
    assert runs[0].data.metrics["delta.dino"] == summary.loc["student - supervisor", "dino"]
    assert "dog.student.clip_t" in runs[0].data.metrics

    # Nothing changed: every subject comes from Prefect's cache; nothing is re-embedded.
    second = benchmark(str(dataset), SUBJECTS, **run)
    assert all(s["cached"] for s in second["subjects"].values()) and not second["failed"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "scores.csv"), table)

    # One subject's results lost: only it re-runs; its evaluation regenerates the same images, whose
    # embeddings (and the references') are all served from the embedding cache.
    (project / "runs/dog/outputs/metrics.json").unlink()
    third = benchmark(str(dataset), SUBJECTS, **run)
    assert {n: s["cached"] for n, s in third["subjects"].items()} == {
        "backpack": True, "can": True, "cat": True, "dog": False}
    stats = json.loads((project / "runs/dog/outputs/evaluate/embedding_cache.json").read_text())
    assert stats["misses"] == 0 and stats["hits"] > 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "scores.csv"), table)

    assert compare.main(["--out", str(tmp_path / "compare")]) == 0
    rows = pd.read_csv(tmp_path / "compare" / "compare.csv")
    assert set(rows["method"]) == {"student", "supervisor", "delta"} and len(set(rows["run_id"])) == 3
    assert (tmp_path / "compare" / "compare.png").stat().st_size > 0

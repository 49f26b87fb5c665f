"""The multi-subject benchmark end to end on the shared DreamBench subjects, at the tiniest settings: each subject a
flow run on a Prefect process work pool served by workers of this test, against a server of its own."""
from __future__ import annotations

import contextvars
import os
import shutil
import signal
import threading

import mlflow
import pandas as pd
import pytest
import yaml
from conftest import REPO, paths
from PIL import Image

from flows.benchmark import benchmark
from orchestration import pool, server
from orchestration.cache import stage_key, write_stamp
from proxytune.params import ProxytuneError, load_params

SHARED = REPO.parent / "shared" / "dreambench"
SUBJECTS = ["backpack", "can", "cat"]
TINIEST = {
    "supervisor": {"steps": 1, "num_class_images": 1, "sample_steps": 1, "checkpoint_every": 0},
    "synthesize": {"num_images": 2, "sample_steps": 1, "batch_size": 2},
    "student": {"steps": 1, "batch_size": 2, "checkpoint_every": 0},
    "evaluate": {"prompts_per_model": 1, "images_per_prompt": 2, "pres_images": 1},
}
# Workers that look for runs every 2 s (Prefect: 10) and beat every 5 s (30), so a killed one is found in 15 s.
WORKER_ENV = {"PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_HEARTBEAT_SECONDS": "5"}
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/dreambench not present")


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A server of this module's own, stopped by its pid."""
    process, api = server.start(tmp_path_factory.mktemp("prefect-home"))
    yield api
    process.terminate()
    process.wait(timeout=60)


@pytest.fixture
def tiny(project, tmp_path, prefect_api):
    """The benchmark's arguments for `project` at TINIEST, with models/ from the session's bootstrap, and a copy
    of the shared dataset."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in TINIEST.items():
        params[section].update(values)
    params_file = project / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    boot = paths(project, "bootstrap")
    write_stamp("bootstrap", stage_key("bootstrap", load_params(params_file), boot), boot)
    dataset = tmp_path / "dreambench"
    shutil.copytree(SHARED, dataset)
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        yield {"dataset": str(dataset), "params_file": str(params_file), "under": str(project)}


def _workers(names, api, logs):
    return {name: pool.start_worker("test-pool", name, api, logs / f"{name}.log", WORKER_ENV) for name in names}


def _subject_runs(work_pool: str):
    from prefect import get_client
    from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[work_pool])))


def test_two_workers_share_the_subjects_and_a_failing_one_is_left_out(tiny, project, tmp_path, prefect_api):
    out = project / "outputs/benchmark"
    run = {**tiny, "pool": "test-pool"}
    workers = _workers(["w1"], prefect_api, tmp_path)
    try:
        alone = benchmark(subjects=SUBJECTS, **run)
        assert not alone["failed"] and not any(s["cached"] for s in alone["subjects"].values())
        one_worker = pd.read_csv(out / "scores.csv")
        assert sorted(set(one_worker["subject"])) == SUBJECTS and len(one_worker) == len(SUBJECTS) * 2

        shutil.rmtree(project / "runs")  # the subjects' data gone: every stage runs again
        dog2 = tiny["dataset"] + "/dog2"  # listed in prompts_and_classes.txt; one photo is too few for `prepare`
        os.mkdir(dog2)
        Image.new("RGB", (80, 80), "red").save(dog2 + "/00.jpg")
        workers |= _workers(["w2"], prefect_api, tmp_path)
        before = {r.id for r in _subject_runs("test-pool")}
        shared = benchmark(subjects=[*SUBJECTS, "dog2"], **run)
    finally:
        for worker in workers.values():
            pool.stop_worker(worker)

    assert list(shared["failed"]) == ["dog2"] and "at least 2" in shared["failed"]["dog2"]
    assert not any(s["cached"] for s in shared["subjects"].values())
    second = [r for r in _subject_runs("test-pool") if r.id not in before]
    assert {r.labels[pool.WORKER_LABEL] for r in second} == {"w1", "w2"}  # both workers ran subjects
    [failed] = [r for r in second if r.parameters["name"] == "dog2"]
    assert failed.state.is_failed() and failed.run_count == 2  # retried once (SUBJECT_RETRIES), then left out

    # the same scores, to the bit, whichever worker ran a subject
    pd.testing.assert_frame_equal(pd.read_csv(out / "scores.csv"), one_worker)
    summary = pd.read_csv(out / "aggregate.csv", float_precision="round_trip").set_index("method")
    assert list(summary.index) == ["student", "supervisor", "student - supervisor"]
    assert summary.loc["student - supervisor", "dino"] == (
        summary.loc["student", "dino"] - summary.loc["supervisor", "dino"])
    assert (out / "aggregate.md").read_text().startswith("| Method | DINO | CLIP-I | CLIP-T | PRES |")
    assert sorted(p.name for p in (out / "grids").iterdir()) == [f"{s}.png" for s in SUBJECTS]
    runs = mlflow.search_runs(experiment_names=["proxytune"], filter_string="tags.`proxytune.benchmark` = 'true'",
                              output_format="list")
    assert [r.data.tags["failed"] for r in runs] == ["dog2", ""]  # newest first
    assert "can.student.clip_t" in runs[0].data.metrics


def test_a_subject_whose_worker_is_killed_is_crashed_and_completed_next_time(tiny, project, tmp_path, prefect_api):
    from prefect import get_client

    run = {**tiny, "subjects": ["can"], "pool": "crash-pool"}
    workers = {name: pool.start_worker("crash-pool", name, prefect_api, tmp_path / f"{name}.log", WORKER_ENV)
               for name in ("k1", "k2")}
    victim = {}
    supervised, synthesized = (paths(project / "runs" / "can", stage)["out"] for stage in ("supervise", "synthesize"))

    def kill_its_worker_mid_run():
        """Once the subject is past `synthesize`, kill its worker and its run's process, as a lost machine."""
        while not synthesized.exists():
            threading.Event().wait(0.5)
        [subject] = _subject_runs("crash-pool")
        victim.update(run=subject.id, worker=subject.labels[pool.WORKER_LABEL])
        os.killpg(int(subject.infrastructure_pid), signal.SIGKILL)
        os.killpg(workers[victim["worker"]].pid, signal.SIGKILL)
        workers[victim["worker"]].wait()

    killer = threading.Thread(target=contextvars.copy_context().run, args=(kill_its_worker_mid_run,))  # our API
    killer.start()
    try:
        with pytest.raises(ProxytuneError, match="every subject failed .*Crashed"):
            benchmark(**run)
        killer.join()
        with get_client(sync_client=True) as client:
            assert client.read_flow_run(victim["run"]).state.type.value == "CRASHED"
        published = supervised.stat().st_ino
        second = benchmark(**run)  # the other worker takes the subject
    finally:
        for worker in workers.values():
            if worker.poll() is None:
                pool.stop_worker(worker)
    assert second["subjects"] == {"can": {"cached": False, "failed": False}}
    [latest] = [r for r in _subject_runs("crash-pool") if r.id != victim["run"]]
    assert latest.labels[pool.WORKER_LABEL] != victim["worker"]
    assert supervised.stat().st_ino == published  # it resumed: the supervisor the killed run trained was kept

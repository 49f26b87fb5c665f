"""What a user finds in Prefect's UI after a run, read back through Prefect's API: the stages' artifacts
(metrics table, grid, proxies), a progress artifact per stage, step logs with it/s and ETA, a run name that says
what ran."""
from __future__ import annotations

import logging

from flows.pipeline import pipeline
from proxytune.io import sha256_json
from proxytune.params import load_params
from proxytune.progress import Progress, reporting

STAGES = ["synthesize", "distill", "evaluate"]


def test_a_stage_run_shows_artifacts_progress_and_step_logs(synthesized):
    # imported here: the project's Prefect settings must be in place first (`flows` sets them)
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    params_file = synthesized / "params.yaml"
    state = pipeline(params_file=str(params_file), stages=STAGES, under=str(synthesized), return_state=True)
    assert state.is_completed(), state.message
    run_id = state.state_details.flow_run_id
    again = pipeline(params_file=str(params_file), stages=STAGES, under=str(synthesized), return_state=True)
    assert all(stage["cached"] for stage in again.result().values())
    APILogWorker.drain_all(timeout=30)  # logs reach the API in batches
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        artifacts, cached_artifacts = (client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run]))) for run in (run_id, again.state_details.flow_run_id))
        logs = [log.message for log in client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[run_id])))]

    params = load_params(params_file)
    assert run.name == f"synthesize+distill+evaluate · demo_toy · {sha256_json(params)[:8]}"
    by_key = {a.key: a for a in artifacts}
    assert {f"{stage}-demo-toy-progress" for stage in STAGES} | {
        "synthesize-demo-toy", "synthesize-demo-toy-proxies", "distill-demo-toy", "evaluate-demo-toy"} <= set(by_key)
    assert all(by_key[f"{stage}-demo-toy-progress"].data == 100.0 for stage in STAGES)
    # a run served from cache shows the same results (it has no loop to follow)
    assert {a.key: a.data for a in cached_artifacts} == {k: a.data for k, a in by_key.items() if "progress" not in k}

    evaluation = by_key["evaluate-demo-toy"].data
    assert "| Method | DINO | CLIP-I | CLIP-T |" in evaluation
    assert all(f"| {row} |" in evaluation for row in ("supervisor", "student", "student - supervisor"))
    assert "![references | supervisor | student](data:image/png;base64," in evaluation
    assert "![kept proxies](data:image/png;base64," in by_key["synthesize-demo-toy"].data
    proxies = by_key["synthesize-demo-toy-proxies"]
    assert proxies.type == "table" and '"kept": true' in proxies.data and '"prompt"' in proxies.data

    steps = [m for m in logs if m.startswith("distill: step ")]
    assert steps[0].startswith("distill: step 1/4 loss ") and steps[-1].startswith("distill: step 4/4 loss ")
    assert all(" step/s | ETA " in m for m in steps)
    assert any(m.startswith("synthesize: image 4/4 | ") for m in logs)
    assert any(m.startswith("supervisor samples: image 2/2 | ") for m in logs)


def test_progress_logs_at_a_rate_and_tells_listeners(caplog):
    heard = []
    with caplog.at_level(logging.INFO, logger="proxytune.progress"), reporting(heard.append):
        with Progress("train", 100, start=40, log_every=3600) as bar:
            for _ in range(60):
                bar.advance(loss=0.5)
    lines = caplog.messages
    assert len(lines) == 2  # the first step and the last: a fast loop does not flood the logs
    assert lines[0].startswith("train: step 41/100 loss 0.5 | ") and lines[1].startswith("train: step 100/100 ")
    assert lines[1].endswith("ETA 0:00")
    assert [t.done for t in heard] == list(range(41, 101)) and heard[-1].values == {"loss": 0.5}

"""Prefect work pools for the benchmark: a `process` pool with N local workers, and the crash check for runs
whose worker is gone.

Here a `process` pool's workers run each flow run in a subprocess from the project folder; on a cluster the same
deployment goes to a Docker or Kubernetes pool (docs/scale.md). A worker killed outright (SIGKILL, a lost machine)
cannot report the run it held, which stays Running; its heartbeats to the pool stop, so `crash_orphans` marks
such runs Crashed once the worker has been silent for MISSED_HEARTBEATS of its own heartbeat periods.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator
from uuid import UUID

from orchestration.server import MISSED_HEARTBEATS  # the same rule as for a flow run's heartbeats

POOL = "proxytune-process"
WORKER_LABEL = "prefect.worker.name"  # the label a worker gives each flow run it submits
LIVE = ["PENDING", "RUNNING"]  # states a run holds only while its worker's process lives


def ensure_pool(name: str = POOL, concurrency: int | None = None) -> None:
    """Create the `process` work pool `name` unless it exists; `concurrency` caps its runs at once."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name=name, type="process", concurrency_limit=concurrency,
                                               base_job_template=ProcessWorker.get_default_base_job_template()))


def start_worker(pool: str, name: str, api: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`prefect worker start` for `pool` in its own session (stopped with `stop_worker`), logging to `log`: one run
    at a time (a subject holds a machine's accelerator), `env` added to this process's environment."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type",
                                 "process", "--name", name, "--limit", "1"],
                                env={**os.environ, **(env or {}), "PREFECT_API_URL": api},
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def stop_worker(worker: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM, as Ctrl-C would; a worker that does not stop in `timeout` seconds is killed."""
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


@contextlib.contextmanager
def local_workers(pool: str, count: int, api: str, logs: Path, env: dict[str, str] | None = None
                  ) -> Iterator[list[str]]:
    """`count` workers of `pool` on this machine (`start_worker`) for the duration; yields their names."""
    workers = {f"{pool}-{i}": None for i in range(1, count + 1)}
    try:
        for name in workers:
            workers[name] = start_worker(pool, name, api, logs / f"{name}.log", env)
        yield list(workers)
    finally:
        for worker in filter(None, workers.values()):
            stop_worker(worker)


def _gone(worker, now: datetime) -> bool:
    if worker is None:
        return True
    if worker.last_heartbeat_time is None:
        return False
    period = timedelta(seconds=worker.heartbeat_interval_seconds or 30)
    return now - worker.last_heartbeat_time > MISSED_HEARTBEATS * period


def crash_orphans(client, pool: str, flow_run_ids: list[UUID] | None = None) -> list[UUID]:
    """Mark Crashed every Pending or Running flow run of `pool` (or of those among `flow_run_ids`) whose worker
    has gone silent; return their ids."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.states import Crashed

    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=LIVE)),
                                      id=FlowRunFilterId(any_=flow_run_ids) if flow_run_ids is not None else None),
        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])))
    workers = {w.name: w for w in client.read_workers_for_work_pool(pool)}
    now = datetime.now(timezone.utc)
    crashed = []
    for run in runs:
        name = (run.labels or {}).get(WORKER_LABEL)
        if name and _gone(workers.get(name), now):
            client.set_flow_run_state(run.id, Crashed(message=f"worker {name} stopped sending heartbeats: it or its "
                                                              f"machine was killed"), force=True)
            crashed.append(run.id)
    return crashed

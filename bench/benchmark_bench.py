"""DreamBench benchmark throughput on a Prefect process work pool: subjects per hour with 1 and 2 local workers.

The shared DreamBench subjects (../shared/dreambench) at the tiniest settings (the test suite's), each phase from
empty subject folders and caches, against one Prefect server of this bench's own. Bootstrap runs before the
timings. Writes bench/results/benchmark.json.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
DATASET = REPO.parent / "shared" / "dreambench"
SUBJECTS = ["backpack", "can", "cat", "dog"]
TINIEST = {
    "supervisor": {"steps": 1, "num_class_images": 1, "sample_steps": 1, "checkpoint_every": 0},
    "synthesize": {"num_images": 2, "sample_steps": 1, "batch_size": 2},
    "student": {"steps": 1, "batch_size": 2, "checkpoint_every": 0},
    "evaluate": {"prompts_per_model": 1, "images_per_prompt": 2, "pres_images": 1},
}
WORKER_ENV = {"PREFECT_WORKER_QUERY_SECONDS": "2"}  # Prefect's 10 s between polls would dominate tiny subjects


def main() -> None:
    if not DATASET.is_dir():
        sys.exit(f"benchmark_bench: {DATASET} not present")
    work = Path(tempfile.mkdtemp(prefix="proxytune-bench-"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINIEST.items():
        params[section].update(values)
    params["subject"]["images"] = str(work / params["subject"]["images"])  # bootstrap writes the photos there
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    os.environ["PREFECT_HOME"] = str(work / ".prefect")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.benchmark import benchmark
    from flows.pipeline import pipeline
    from orchestration import pool, server

    process, api = server.start(work / ".prefect")
    run = {"dataset": str(DATASET), "subjects": SUBJECTS, "params_file": str(work / "params.yaml"),
           "under": str(work), "pool": "bench-pool"}
    rows = {}
    try:
        with temporary_settings({PREFECT_API_URL: api}):
            pipeline(stages=["bootstrap"], params_file=run["params_file"], under=str(work))
            for workers in (1, 2):
                shutil.rmtree(work / "runs", ignore_errors=True)
                os.environ["PROXYTUNE_CACHE"] = str(work / f"cache-{workers}")  # no embeddings from the last phase
                with pool.local_workers("bench-pool", workers, api, work / "workers", WORKER_ENV):
                    start = time.perf_counter()
                    result = benchmark(**run)
                    seconds = time.perf_counter() - start
                if result["failed"]:
                    sys.exit(f"benchmark_bench: subjects failed: {result['failed']}")
                rows[workers] = {"seconds": seconds, "subjects_per_hour": len(SUBJECTS) * 3600 / seconds}
    finally:
        process.terminate()
        process.wait(timeout=60)
    print(f"\n{len(SUBJECTS)} subjects, tiny settings   {'seconds':>9}{'subjects/hour':>15}")
    for workers, r in rows.items():
        print(f"{workers} worker{'s' if workers > 1 else ' '}                        {r['seconds']:9.1f}"
              f"{r['subjects_per_hour']:15.1f}")
    print(f"speed-up with 2 workers: {rows[1]['seconds'] / rows[2]['seconds']:.2f}x")
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps({"subjects": SUBJECTS, "workers": rows}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

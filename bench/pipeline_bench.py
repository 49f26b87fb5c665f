"""Pipeline benchmark: every stage cold (fresh project copy, empty caches), then warm (nothing changed).

Both passes run side by side in one process, so the warm/cold ratio is meaningful on a noisy machine.
Prints a table and writes bench/results/pipeline.json.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COPY = ["params.yaml", "dvc.yaml", ".dvcignore", "tasks", "proxytune", "ar_models", "flows"]


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="proxytune-bench-"))
    for name in COPY:
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, work / name)
    os.chdir(work)
    os.environ["PREFECT_HOME"] = str(work / ".prefect")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    sys.path.insert(0, str(REPO))
    from flows.pipeline import STAGES, pipeline

    pipeline(stages=[])  # start Prefect's temporary server once, outside the timings
    rows = {}
    for phase in ("cold", "warm"):
        for stage in STAGES:
            start = time.perf_counter()
            result = pipeline(stages=[stage])[stage]
            rows.setdefault(stage, {})[phase] = time.perf_counter() - start
            rows[stage][f"{phase}_cached"] = result["cached"]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cold = sum(r["cold"] for r in rows.values())
    warm = sum(r["warm"] for r in rows.values())
    print(f"\n{'stage':<12}{'cold s':>9}{'warm s':>9}{'warm/cold':>11}")
    for stage, r in rows.items():
        print(f"{stage:<12}{r['cold']:9.2f}{r['warm']:9.2f}{r['warm'] / r['cold']:11.3f}"
              f"{'' if r['warm_cached'] else '   (NOT cached)'}")
    print(f"{'total':<12}{cold:9.2f}{warm:9.2f}{warm / cold:11.3f}")
    print(f"peak RSS {peak_mb:.0f} MB")
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps({"stages": rows, "peak_rss_mb": peak_mb}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

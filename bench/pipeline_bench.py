"""Pipeline benchmark: every stage cold (fresh project copy, empty caches), then warm (nothing changed).

Two paths, each cold then warm side by side, so the ratios are meaningful on a noisy machine:
the Prefect flow in one process (per-stage task time), and `dvc repro` as `make demo` runs it (one
process per stage, so interpreter start-up is included). Writes bench/results/pipeline.json.
"""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def fresh_project() -> Path:
    """A copy of the working tree's files, as a fresh clone has them: DVC runs in a git repository."""
    work = Path(tempfile.mkdtemp(prefix="proxytune-bench-"))
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, work / name)
    return work


def dvc_repro_times(work: Path) -> dict[str, float]:
    """Wall time per stage of one `dvc repro`, from the moments DVC announces each stage."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PROXYTUNE_PYTHON": sys.executable}
    env.pop("PREFECT_HOME", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.perf_counter()
    marks = [("dvc start-up", start)]
    proc = subprocess.Popen([str(bin_dir / "dvc"), "repro"], cwd=work, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in proc.stdout:
        if m := re.match(r"Running stage '(\w+)'", line):
            marks.append((m.group(1), time.perf_counter()))
    if proc.wait() != 0:
        raise SystemExit("dvc repro failed")
    marks.append(("end", time.perf_counter()))
    times = {name: t1 - t0 for (name, t0), (_, t1) in zip(marks, marks[1:])}
    times["total"] = marks[-1][1] - start
    return times


def bench_dvc() -> dict:
    work = fresh_project()
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)  # .dvc/ is tracked: the copy has it
    cold, warm = dvc_repro_times(work), dvc_repro_times(work)
    print(f"\ndvc repro   {'cold s':>9}{'warm s':>9}")
    for name in cold:
        print(f"{name:<12}{cold[name]:9.2f}{warm.get(name, 0.0):9.2f}")
    print(f"warm/cold total {warm['total'] / cold['total']:.3f}")
    shutil.rmtree(work, ignore_errors=True)
    return {"cold": cold, "warm": warm}


def bench_flow() -> dict:
    """The flow in this process, run from the project with every stage's data in a fresh folder."""
    work = Path(tempfile.mkdtemp(prefix="proxytune-bench-"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["subject"]["images"] = str(work / params["subject"]["images"])  # bootstrap writes the photos there
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    os.environ["PREFECT_HOME"] = str(work / ".prefect")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["PROXYTUNE_CACHE"] = str(work / ".proxytune" / "cache")
    from flows.pipeline import STAGES, pipeline

    run = {"params_file": str(work / "params.yaml"), "under": str(work)}
    pipeline(stages=[], **run)  # start Prefect's temporary server once, outside the timings
    rows = {}
    for phase in ("cold", "warm"):
        for stage in STAGES:
            start = time.perf_counter()
            result = pipeline(stages=[stage], **run)[stage]
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
    shutil.rmtree(work, ignore_errors=True)
    return {"stages": rows, "peak_rss_mb": peak_mb}


def main() -> None:
    results = {"dvc_repro": bench_dvc(), "flow": bench_flow()}
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

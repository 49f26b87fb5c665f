"""What orchestration costs: `dvc repro` of the demo (one process per stage, the shared Prefect server of
orchestration/server.py) against the same stages' `run` functions called in one Python process, both cold in
fresh project copies, side by side in one run; then each stage's command again with its work cached, which is
its start-up overhead alone (interpreter, imports, Prefect flow and task runs, cache check; goal < 3 s).
Both runs must publish the same outputs/metrics.json. Writes bench/results/orchestration.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.pipeline_bench import dvc_repro_times, fresh_project  # noqa: E402


def in_process(work: Path) -> dict[str, float]:
    """Every stage's `run` in this process (started in `work`), in dvc.yaml's order, with dvc.yaml's paths; seconds
    per stage."""
    os.environ["PROXYTUNE_CACHE"] = str(work / ".proxytune" / "cache")
    import importlib

    from flows.pipeline import STAGES
    from orchestration.cache import stage_paths
    from proxytune.params import load_params
    from testbed.claims import NoLog

    params = load_params(work / "params.yaml")
    times = {}
    for stage in STAGES:
        start = time.perf_counter()
        importlib.import_module(f"tasks.{stage}").run(params, NoLog(), stage_paths(stage, work, project=work))
        times[stage] = time.perf_counter() - start
    return times


def stage_commands(work: Path) -> dict[str, str]:
    return {name: spec["cmd"] for name, spec in yaml.safe_load((work / "dvc.yaml").read_text())["stages"].items()}


def one_process(env: dict) -> tuple[dict[str, float], float, dict]:
    """The peer, cold: every stage in one process started here (its start-up and imports are counted)."""
    peer_dir = fresh_project()
    start = time.perf_counter()
    child = subprocess.run([sys.executable, __file__, "--in-process", str(peer_dir)], cwd=peer_dir, env=env, check=True,
                           capture_output=True, text=True)
    total = time.perf_counter() - start
    metrics = json.loads((peer_dir / "outputs" / "metrics.json").read_text())
    shutil.rmtree(peer_dir, ignore_errors=True)
    return json.loads(child.stdout.strip().splitlines()[-1]), total, metrics


def dvc_project(env: dict, cached_reruns: bool) -> tuple[dict[str, float], dict[str, float], float, dict]:
    """`dvc repro`, cold, in a fresh project with its shared Prefect server (started outside the timings); then,
    if asked, each stage's own command again with its work cached."""
    work = fresh_project()
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)  # .dvc/ is tracked: the copy has it
    server_env = {**env, "PREFECT_HOME": str(work / ".prefect")}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "orchestration.server"], cwd=work, env=server_env, check=True,
                   capture_output=True, text=True)
    server_s = time.perf_counter() - start
    overhead = {}
    try:
        dvc = dvc_repro_times(work)
        for stage, cmd in stage_commands(work).items() if cached_reruns else ():
            start = time.perf_counter()
            done = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, check=True, capture_output=True,
                                  text=True)
            overhead[stage] = time.perf_counter() - start
            if "cached" not in done.stdout:
                raise SystemExit(f"{stage} re-ran instead of hitting its cache: {done.stdout!r}")
    finally:
        subprocess.run([sys.executable, "-m", "orchestration.server", "--stop"], cwd=work, env=server_env)
    metrics = json.loads((work / "outputs" / "metrics.json").read_text())
    shutil.rmtree(work, ignore_errors=True)
    return dvc, overhead, server_s, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2,
                        help="cold runs of each side, alternated; each stage keeps its fastest (default: 2)")
    args = parser.parse_args()
    env = {**os.environ, "PROXYTUNE_PYTHON": sys.executable}
    for key in ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PROXYTUNE_CACHE"):
        env.pop(key, None)
    os.environ.pop("PREFECT_HOME", None)
    # one process, then dvc repro, round after round: a change of load hits a round of each side, not one side
    peer, peer_total, dvc, overhead = {}, float("inf"), {}, {}
    for round_ in range(args.rounds):
        stages, total, peer_metrics = one_process(env)
        peer = {k: min(v, peer.get(k, v)) for k, v in stages.items()}
        peer_total = min(peer_total, total)
        times, reruns, server_s, dvc_metrics = dvc_project(env, cached_reruns=round_ == args.rounds - 1)
        dvc = {k: min(v, dvc.get(k, v)) for k, v in times.items()}
        overhead = reruns or overhead
        if dvc_metrics != peer_metrics:
            raise SystemExit(f"dvc repro and the in-process stages published different metrics: "
                             f"{dvc_metrics} vs {peer_metrics}")

    stages_dvc = sum(v for k, v in dvc.items() if k in peer)
    print(f"{args.rounds} alternated cold rounds of each side, fastest kept per stage; the shared Prefect server "
          f"started in {server_s:.1f} s (last round), outside the timings; load average {os.getloadavg()}")
    print(f"{'stage':<12}{'dvc repro s':>12}{'in-process s':>14}{'difference':>12}{'cached re-run s':>17}")
    for stage, seconds in peer.items():
        print(f"{stage:<12}{dvc[stage]:12.2f}{seconds:14.2f}{dvc[stage] - seconds:12.2f}{overhead[stage]:17.2f}")
    mean_overhead = sum(overhead.values()) / len(overhead)
    print(f"{'total':<12}{dvc['total']:12.2f}{peer_total:14.2f}{dvc['total'] - peer_total:12.2f}"
          f"{sum(overhead.values()):17.2f}")
    print(f"dvc repro / one process: {dvc['total'] / peer_total:.2f}x; per-stage start-up (cached re-run) mean "
          f"{mean_overhead:.2f} s, max {max(overhead.values()):.2f} s (goal < 3 s); orchestration share of the "
          f"demo {(dvc['total'] - peer_total) / dvc['total']:.0%} (goal <= 10%); same metrics.json")
    out = REPO / "bench" / "results" / "orchestration.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dvc_repro": dvc, "in_process": peer, "in_process_total_s": peer_total,
                               "stages_in_dvc_s": stages_dvc, "cached_rerun_s": overhead, "server_start_s": server_s,
                               "ratio_dvc_over_in_process": dvc["total"] / peer_total, "rounds": args.rounds,
                               "load_average": os.getloadavg(),
                               "orchestration_share": (dvc["total"] - peer_total) / dvc["total"]}, indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--in-process"]:
        print(json.dumps(in_process(Path(sys.argv[2]))))
    else:
        main()

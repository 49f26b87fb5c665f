"""Fresh-clone `make install` with an empty wheel cache: pip vs uv, one after the other in one run; with `--demo`,
then `make demo` in the last clone, which makes the figure a user sees first: a fresh clone's `make demo`.

Not a *_bench.py (`make bench` does not run it): it downloads every wheel of requirements.lock from the registry
twice. Each installer gets a fresh clone of the checked-out branch, a cache folder of its own that starts empty,
and no pip config (no local wheel folders), so both fetch the same files from the same index. uv is taken from
PATH or `--uv`. Writes bench/results/install.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def fresh_clone(where: Path) -> Path:
    branch = subprocess.run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    subprocess.run(["git", "clone", "--quiet", "--branch", branch, str(REPO), str(where)], check=True)
    return where


def install_env(installer: str, uv: str | None, work: Path) -> dict:
    """No pip or uv config, an empty cache of the installer's own; uv on PATH only for the uv row (the Makefile
    picks it up)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_", "VIRTUAL_ENV"))}
    path = [p for p in env["PATH"].split(os.pathsep) if not (Path(p) / "uv").exists()]
    if installer == "uv":
        path.insert(0, str(Path(uv).parent))
    env.update(PATH=os.pathsep.join(path), PIP_CONFIG_FILE=os.devnull, PIP_CACHE_DIR=str(work / "pip-cache"),
               UV_CACHE_DIR=str(work / "uv-cache"), UV_NO_CONFIG="1")
    return env


def timed_install(installer: str, uv: str | None, work: Path) -> dict:
    """`make install` in a fresh clone."""
    clone = fresh_clone(work / installer)
    start = time.perf_counter()
    subprocess.run(["make", "install"], cwd=clone, env=install_env(installer, uv, work), check=True,
                   capture_output=True, text=True)
    seconds = time.perf_counter() - start
    packages = subprocess.run([str(clone / ".venv/bin/python"), "-m", "pip", "list", "--format=freeze"],
                              capture_output=True, text=True, check=True).stdout.split()
    return {"seconds": seconds, "packages": len(packages), "freeze": sorted(packages), "clone": clone}


def timed_demo(clone: Path, env: dict) -> float:
    """`make demo` in an installed clone, on a free port of its own; the server it starts is stopped after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**env, "PREFECT_SERVER_API_PORT": str(port)}
    for key in ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PROXYTUNE_CACHE", "PROXYTUNE_PYTHON"):
        env.pop(key, None)
    start = time.perf_counter()
    try:
        subprocess.run(["make", "demo"], cwd=clone, env=env, check=True, capture_output=True, text=True)
        return time.perf_counter() - start
    finally:
        subprocess.run([str(clone / ".venv/bin/python"), "-m", "orchestration.server", "--stop"], cwd=clone,
                       env={**env, "PREFECT_HOME": str(clone / ".prefect")}, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--uv", default=shutil.which("uv"), help="the uv binary (default: uv on PATH)")
    parser.add_argument("--installers", default="pip,uv", help="which to time, in order (default: pip,uv)")
    parser.add_argument("--demo", action="store_true", help="then time `make demo` in the last installer's clone")
    args = parser.parse_args()
    installers = args.installers.split(",")
    if "uv" in installers and not args.uv:
        raise SystemExit("no uv on PATH: `pip install uv` (into any venv) and pass --uv PATH")
    work = Path(tempfile.mkdtemp(prefix="proxytune-install-"))
    rows = {name: timed_install(name, args.uv, work) for name in installers}
    for name, r in rows.items():
        print(f"{name:4s} fresh clone `make install`, empty cache: {r['seconds']:6.1f} s, {r['packages']} packages")
    same = None
    if len(rows) == 2:
        (a, ra), (b, rb) = rows.items()
        same = ra["freeze"] == rb["freeze"]
        print(f"{a} / {b}: {ra['seconds'] / rb['seconds']:.1f}x; same versions installed: {same}")
        if not same:
            print("differ:", sorted(set(ra["freeze"]) ^ set(rb["freeze"])))
    result = {"same_versions": same, "load_average": os.getloadavg(),
              **{k: {"seconds": v["seconds"], "packages": v["packages"]} for k, v in rows.items()}}
    if "uv" in rows:
        result["uv_version"] = subprocess.run([args.uv, "--version"], capture_output=True, text=True).stdout.strip()
    if args.demo:
        last = installers[-1]
        demo = timed_demo(rows[last]["clone"], install_env(last, args.uv, work))
        result["fresh_clone_demo"] = {"installer": last, "install_s": rows[last]["seconds"], "demo_s": demo,
                                      "total_s": rows[last]["seconds"] + demo}
        print(f"fresh clone `make demo` with {last}: install {rows[last]['seconds']:.0f} s + demo {demo:.0f} s = "
              f"{rows[last]['seconds'] + demo:.0f} s (goal <= 300 s); load average {os.getloadavg()}")
    out = REPO / "bench" / "results" / "install.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Fresh-clone `make install` with an empty wheel cache: pip vs uv, one after the other in one run.

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


def timed_install(installer: str, uv: str | None, work: Path) -> dict:
    """`make install` in a fresh clone; uv on PATH only for the uv row (the Makefile picks it up)."""
    clone = fresh_clone(work / installer)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_", "VIRTUAL_ENV"))}
    path = [p for p in env["PATH"].split(os.pathsep) if not (Path(p) / "uv").exists()]
    if installer == "uv":
        path.insert(0, str(Path(uv).parent))
    env.update(PATH=os.pathsep.join(path), PIP_CONFIG_FILE=os.devnull, PIP_CACHE_DIR=str(work / "pip-cache"),
               UV_CACHE_DIR=str(work / "uv-cache"), UV_NO_CONFIG="1")
    start = time.perf_counter()
    subprocess.run(["make", "install"], cwd=clone, env=env, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    packages = subprocess.run([str(clone / ".venv/bin/python"), "-m", "pip", "list", "--format=freeze"],
                              capture_output=True, text=True, check=True).stdout.split()
    return {"seconds": seconds, "packages": len(packages), "freeze": sorted(packages)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--uv", default=shutil.which("uv"), help="the uv binary (default: uv on PATH)")
    args = parser.parse_args()
    if not args.uv:
        raise SystemExit("no uv on PATH: `pip install uv` (into any venv) and pass --uv PATH")
    work = Path(tempfile.mkdtemp(prefix="proxytune-install-"))
    rows = {name: timed_install(name, args.uv, work) for name in ("pip", "uv")}
    same = rows["pip"]["freeze"] == rows["uv"]["freeze"]
    for name, r in rows.items():
        print(f"{name:4s} fresh clone `make install`, empty cache: {r['seconds']:6.1f} s, {r['packages']} packages")
    print(f"pip / uv: {rows['pip']['seconds'] / rows['uv']['seconds']:.1f}x; same versions installed: {same}")
    if not same:
        diff = sorted(set(rows["pip"]["freeze"]) ^ set(rows["uv"]["freeze"]))
        print("differ:", diff)
    uv_version = subprocess.run([args.uv, "--version"], capture_output=True, text=True).stdout.strip()
    out = REPO / "bench" / "results" / "install.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"uv": uv_version, "same_versions": same,
                               **{k: {"seconds": v["seconds"], "packages": v["packages"]} for k, v in rows.items()}},
                              indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Proxy synthesis benchmark: images/s batched vs one at a time, and one process vs two under accelerate.

1. On the tiny supervisor (built here into a temp folder), the same proxies rendered one per pipeline call
   and `BATCH` per call, each mode in its own process so its peak memory is its own.
2. The synthesize stage in a throw-away project, once in this process and once as
   `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m tasks.synthesize` (gloo) followed by the stage, which
   publishes; the two published manifests must be identical (the bench fails otherwise).
Writes bench/results/synthesize.json.
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

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
IMAGES, BATCH, STEPS, RESOLUTION = 16, 8, 10, 64


class Log:
    def metrics(self, values, step=None):
        pass

    def artifact(self, path, folder=None):
        pass


def worker(model: str, batch_size: int, images: int = IMAGES) -> dict:
    """Render `images` proxies `batch_size` per call after one warm-up call; images/s and peak memory."""
    from proxytune.diffusion import load_pipeline, sample

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(1)  # both modes alike; no spin-waiting threads on a busy CPU
    pipe = load_pipeline(model, scheduler="dpm++").to(device)
    prompts = [f"a sks toy on the beach {i}" for i in range(images)]
    seeds = list(range(images))
    sample(pipe, prompts[:batch_size], seeds[:batch_size], STEPS, 5.0, RESOLUTION, batch_size=batch_size)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    sample(pipe, prompts, seeds, STEPS, 5.0, RESOLUTION, batch_size=batch_size)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"batch_size": batch_size, "images_per_s": images / seconds, "seconds": seconds, "device": device,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}


def bench_batching() -> dict:
    from proxytune.prompts import corpus_words
    from testbed.tiny_supervisors import build_tiny_supervisor

    tmp = Path(tempfile.mkdtemp(prefix="proxytune-synth-bench-"))
    model = build_tiny_supervisor(tmp / "supervisor", corpus_words(), seed=0, image_size=RESOLUTION)
    rows = {}
    for name, batch_size in (("one_at_a_time", 1), ("batched", BATCH)):
        out = subprocess.run([sys.executable, __file__, "--worker", str(model), str(batch_size)], check=True,
                             capture_output=True, text=True)
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    shutil.rmtree(tmp, ignore_errors=True)
    rows["speedup"] = rows["batched"]["images_per_s"] / rows["one_at_a_time"]["images_per_s"]
    print(f"\n{'proxies':<15}{'batch':>6}{'images/s':>10}{'peak RSS MiB':>14}{'peak GPU MiB':>14}")
    for name in ("one_at_a_time", "batched"):
        r = rows[name]
        gpu = f"{r['peak_gpu_mib']:14.1f}" if r["peak_gpu_mib"] is not None else f"{'-':>14}"
        print(f"{name:<15}{r['batch_size']:6d}{r['images_per_s']:10.2f}{r['peak_rss_mib']:14.1f}{gpu}")
    print(f"batched / one at a time: {rows['speedup']:.2f}x ({IMAGES} images, {STEPS} steps, {RESOLUTION} px)")
    return rows


def bench_scaling(sizes=(16, 64, 256)) -> dict:
    """Batched synthesis time against the number of proxies, each size in its own process after a warm-up
    call: linear when the time per proxy stays flat (the largest size's within 25% of the middle one's)."""
    from proxytune.prompts import corpus_words
    from testbed.tiny_supervisors import build_tiny_supervisor

    tmp = Path(tempfile.mkdtemp(prefix="proxytune-synth-scale-"))
    model = build_tiny_supervisor(tmp / "supervisor", corpus_words(), seed=0, image_size=RESOLUTION)
    seconds = {}
    for n in sizes:
        out = subprocess.run([sys.executable, __file__, "--worker", str(model), str(BATCH), str(n)], check=True,
                             capture_output=True, text=True)
        seconds[n] = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
    shutil.rmtree(tmp, ignore_errors=True)
    per_proxy = {n: s / n * 1e3 for n, s in seconds.items()}
    linear = abs(per_proxy[sizes[-1]] / per_proxy[sizes[1]] - 1) <= 0.25
    print("\nsynthesis time vs proxies (batch %d): " % BATCH + ", ".join(
        f"{n}: {s:.1f} s ({per_proxy[n]:.0f} ms/proxy)" for n, s in seconds.items())
        + f" -> {'linear' if linear else 'NOT linear'}")
    return {"seconds": seconds, "ms_per_proxy": per_proxy, "linear": linear}


def bench_processes() -> dict:
    """The stage's own rendering, 1 process vs 2 (accelerate, gloo on CPU); identical results required."""
    import yaml

    from orchestration.cache import stage_paths
    from proxytune.params import load_params
    from tasks import bootstrap, prepare, supervise, synthesize

    work = Path(tempfile.mkdtemp(prefix="proxytune-synth-mp-"))  # every stage's data; the code stays in REPO
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["subject"]["images"] = str(work / params["subject"]["images"])  # bootstrap writes the photos there
    params["supervisor"].update(steps=2, num_class_images=2)
    params["synthesize"].update(num_images=16, batch_size=4)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    os.environ["PROXYTUNE_CACHE"] = str(work / ".proxytune" / "cache")
    params = load_params(work / "params.yaml")
    paths = {stage: stage_paths(stage, work) for stage in ("bootstrap", "prepare", "supervise", "synthesize")}
    for stage in (bootstrap, prepare, supervise):
        stage.run(params, Log(), paths[stage.__name__.rsplit(".", 1)[-1]])

    torch.set_num_threads(1)  # the accelerate processes get one thread each: same kernels, same pixels
    start = time.perf_counter()
    synthesize.run(params, Log(), paths["synthesize"])
    one = time.perf_counter() - start
    out = paths["synthesize"]["out"]
    single = (out / "manifest.jsonl").read_bytes()
    shutil.rmtree(out)

    bin_dir = Path(sys.executable).parent
    # `--cpu` alone starts one process (several need MPI); `--multi_gpu` with ACCELERATE_USE_CPU gives gloo ranks
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    flags = [arg for name, path in paths["synthesize"].items() for arg in (f"--{name.replace('_', '-')}", str(path))]
    start = time.perf_counter()
    launch = subprocess.run([str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                             "--num_cpu_threads_per_process", "1", "--num_machines", "1", "--mixed_precision", "no",
                             "--dynamo_backend", "no", "-m", "tasks.synthesize", "--params", str(work / "params.yaml"),
                             *flags], cwd=REPO, env=env, check=True, capture_output=True, text=True)
    # both ranks write to one pipe, so their lines can interleave: find the greetings anywhere in it
    ranks = set(re.findall(r"synthesize: process (\d+) of 2", launch.stdout))
    if ranks != {"0", "1"}:
        raise SystemExit(f"accelerate did not start 2 ranks: {launch.stdout!r}")
    synthesize.run(params, Log(), paths["synthesize"])  # finds every batch rendered, publishes
    two = time.perf_counter() - start
    merged = (out / "manifest.jsonl").read_bytes()
    if merged != single:
        raise SystemExit("2-process synthesis published a different manifest than 1 process")
    shutil.rmtree(work, ignore_errors=True)
    n = params["synthesize"]["num_images"]
    rows = {"images": n, "one_process_s": one, "two_processes_s": two, "identical_manifest": True}
    print(f"\nstage, {n} proxies   1 process {one:.2f} s   2 processes (accelerate, gloo) {two:.2f} s "
          "(process start-up included)   manifests identical")
    return rows


def main() -> None:
    results = {"batching": bench_batching(), "scaling": bench_scaling(), "processes": bench_processes(),
               "load_average": os.getloadavg()}
    out = REPO / "bench" / "results" / "synthesize.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        print(json.dumps(worker(sys.argv[2], *map(int, sys.argv[3:]))))
    else:
        main()

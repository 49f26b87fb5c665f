"""Supervisor benchmark: DreamBooth-LoRA steps/s with cached latents vs encoding the images every step.

Per family both variants are set up in this process on the same tiny replica and instance images, then run
alternately (after a warm-up round of each, `--repeats` rounds of `--steps` steps each), so a change of load on
the shared machine hits both alike. The ratio is cached / encoding, from the fastest round of each and from the
medians. The images are 128 px so the VAE's share of a step is visible. Writes bench/results/supervise.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.timing import alternate, throughput  # noqa: E402

FAMILIES = ("sd", "flux")
VARIANTS = {"cached_latents": True, "encode_every_step": False}
RESOLUTION, BATCH = 128, 2


def prepare(work: Path, families: list[str]) -> None:
    import numpy as np
    from PIL import Image

    from proxytune.prompts import corpus_words
    from testbed.tiny_supervisors import build_tiny_pipeline

    for family in families:
        build_tiny_pipeline(family, work / family, corpus_words(), seed=0, image_size=RESOLUTION)
    rng = np.random.default_rng(0)
    (work / "instance").mkdir()
    for i in range(4):
        img = Image.fromarray(rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8))
        img.resize((RESOLUTION, RESOLUTION), Image.Resampling.BICUBIC).save(work / "instance" / f"{i}.png")


def recipe(work: Path, family: str, cached: bool):
    from proxytune.dreambooth import DreamBoothConfig, DreamBoothLoRA

    r = DreamBoothLoRA(DreamBoothConfig(
        model=str(work / family), instance_images=sorted((work / "instance").glob("*.png")),
        instance_prompt="a photo of sks toy", class_prompt="a photo of toy", batch_size=BATCH, num_class_images=4,
        sample_steps=2, cache_latents=cached, pivotal_tokens=0, seed=0))
    r.setup()
    return r


def bench_family(work: Path, family: str, steps: int, repeats: int) -> dict:
    recipes = {name: recipe(work, family, cached) for name, cached in VARIANTS.items()}

    def run(r):
        return lambda: [r.train_step() for _ in range(steps)]

    times = alternate({name: run(r) for name, r in recipes.items()}, repeats, warmup=1)
    row = {"times": times, **throughput(steps, times, *VARIANTS)}
    print(f"{family:5s} cached latents {row['cached_latents_per_s']:6.2f} steps/s | encode every step "
          f"{row['encode_every_step_per_s']:6.2f} steps/s | speed-up x{row['ratio']:.2f} (fastest), "
          f"x{row['ratio_median']:.2f} (median)")
    return row


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed round")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of each variant, alternated")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    families = args.families.split(",")
    work = Path(tempfile.mkdtemp(prefix="proxytune-supervise-bench-"))
    os.environ["PROXYTUNE_CACHE"] = str(work / "cache")
    prepare(work, families)
    started = time.perf_counter()
    load = os.getloadavg()
    print(f"{args.threads} threads, load average {load}; {RESOLUTION} px, batch {BATCH} + prior; "
          f"{args.repeats} alternated rounds of {args.steps} steps after a warm-up round of each")
    results = {"steps": args.steps, "repeats": args.repeats, "threads": args.threads, "resolution": RESOLUTION,
               "batch_size": BATCH, "load_average": load,
               "families": {family: bench_family(work, family, args.steps, args.repeats) for family in families}}
    results["load_average_after"] = os.getloadavg()
    results["bench_seconds"] = time.perf_counter() - started
    out = REPO / "bench" / "results" / "supervise.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"load average after {results['load_average_after']}; {results['bench_seconds']:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()

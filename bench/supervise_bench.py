"""Supervisor benchmark: DreamBooth-LoRA steps/s with cached latents vs encoding the images every step.

Each (family, variant) runs in its own process on the same tiny replica and instance images, side by side in
one run, so the ratio is meaningful on a noisy machine and each peak RSS (resource.getrusage maxrss) is that
variant's own. The images are 128 px so the VAE's share of a step is visible. Writes bench/results/supervise.json.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
FAMILIES = ("sd", "flux")
VARIANTS = {"cached_latents": True, "encode_every_step": False}
STEPS, WARMUP, RESOLUTION = 20, 2, 128


def prepare(work: Path) -> None:
    import numpy as np
    from PIL import Image

    from proxytune.prompts import corpus_words
    from testbed.tiny_supervisors import build_tiny_pipeline

    for family in FAMILIES:
        build_tiny_pipeline(family, work / family, corpus_words(), seed=0, image_size=RESOLUTION)
    rng = np.random.default_rng(0)
    (work / "instance").mkdir()
    for i in range(4):
        img = Image.fromarray(rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8))
        img.resize((RESOLUTION, RESOLUTION), Image.Resampling.BICUBIC).save(work / "instance" / f"{i}.png")


def measure(work: Path, family: str, cached: bool) -> dict:
    """One variant in this process: steps/s after warm-up, and this process's peak RSS."""
    import torch

    from proxytune.dreambooth import DreamBoothConfig, DreamBoothLoRA

    torch.set_num_threads(1)
    os.environ["PROXYTUNE_CACHE"] = str(work / "cache")
    recipe = DreamBoothLoRA(DreamBoothConfig(
        model=str(work / family), instance_images=sorted((work / "instance").glob("*.png")),
        instance_prompt="a photo of sks toy", class_prompt="a photo of toy", batch_size=2, num_class_images=4,
        sample_steps=2, cache_latents=cached, seed=0))
    recipe.setup()
    for _ in range(WARMUP):
        recipe.train_step()
    start = time.perf_counter()
    for _ in range(STEPS):
        recipe.train_step()
    seconds = time.perf_counter() - start
    return {"steps_per_s": STEPS / seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="proxytune-supervise-bench-"))
    prepare(work)
    results = {"steps": STEPS, "resolution": RESOLUTION, "batch_size": 2, "families": {}}
    for family in FAMILIES:
        row = {}
        for name, cached in VARIANTS.items():
            out = subprocess.run([sys.executable, __file__, "--child", str(work), family, str(int(cached))],
                                 capture_output=True, text=True, check=True)
            row[name] = json.loads(out.stdout.strip().splitlines()[-1])
        row["speedup"] = row["cached_latents"]["steps_per_s"] / row["encode_every_step"]["steps_per_s"]
        results["families"][family] = row
        print(f"{family:5s} cached latents {row['cached_latents']['steps_per_s']:6.2f} steps/s "
              f"(peak {row['cached_latents']['peak_rss_mb']:.0f} MB) | encode every step "
              f"{row['encode_every_step']['steps_per_s']:6.2f} steps/s "
              f"(peak {row['encode_every_step']['peak_rss_mb']:.0f} MB) | speed-up x{row['speedup']:.2f}")
    out = REPO / "bench" / "results" / "supervise.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(measure(Path(sys.argv[2]), sys.argv[3], bool(int(sys.argv[4])))))
    else:
        main()

"""Student tuning: steps/s with the pre-tokenised cache vs encoding images every step, and peak memory of
LoRA vs full Q/K/V tuning, side by side on a LlamaGen-B-sized GPT (111M, 256 image tokens, VQ-16 at 256²).

The cache comparison runs in this process on one recipe: after a warm-up round of each, `--repeats` rounds of
`--steps` steps with the cache and as many tokenising the batch's images first, alternately, so a change of load
on the shared machine hits both alike; the ratio is from the fastest round of each and from the medians. Each
memory configuration runs in its own process; its training peak is VmHWM after a reset (Linux). Figures go to
bench/results/tuning.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.timing import alternate, throughput  # noqa: E402

STEPS, BATCH, IMAGE, THREADS = 3, 2, 256, 2
COMMON = {"batch_size": BATCH, "mixed_precision": "bf16", "learning_rate": 1e-4}


def build_student(folder: Path):
    from ar_models.llamagen import GPT, GPT_SIZES, VQ_SIZES, LlamaGenStudent, VQModel
    from proxytune.prompts import corpus_words
    from testbed.tiny_students import build_tiny_llamagen

    paths = build_tiny_llamagen(folder / "tiny", corpus_words(), image_size=64)  # borrow its tiny T5 + tokenizer
    from transformers import AutoTokenizer, T5EncoderModel

    encoder = T5EncoderModel.from_pretrained(paths["text_encoder"])
    tokenizer = AutoTokenizer.from_pretrained(paths["text_encoder"])
    vq_config = VQ_SIZES["VQ-16"]
    config = replace(GPT_SIZES["B"], caption_dim=encoder.config.d_model, block_size=(IMAGE // vq_config.downsample) ** 2)
    torch.manual_seed(0)
    return LlamaGenStudent(GPT(config), VQModel(vq_config), encoder, tokenizer, IMAGE)


def reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark (VmHWM) so model building and tokenising don't hide training's peak;
    returns the current RSS in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_mb("VmRSS")


def peak_rss_mb() -> float:
    return status_mb("VmHWM")


def status_mb(field: str) -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def training_data():
    """The student, its 8 training images and their pre-tokenised codes with prompts."""
    from proxytune.tuning import TuningData

    with tempfile.TemporaryDirectory() as tmp:
        student = build_student(Path(tmp))
    images = torch.rand(8, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = [f"a sks toy on the beach {i}" for i in range(8)]
    with torch.no_grad():
        codes = torch.cat([student.encode_images(images[i:i + 2]) for i in range(0, len(images), 2)])
    return student, images, TuningData(codes=codes, prompts=prompts, identifier="sks", class_noun="toy")


def cache_speedup(steps: int, repeats: int) -> dict:
    """Steps/s of one LoRA recipe (default targets) with the cache and tokenising each batch's images first (what
    a loop without the cache does), alternated in this process."""
    from proxytune.tuning import ProxyTuning, TuneConfig

    student, images, data = training_data()
    recipe = ProxyTuning(student, TuneConfig(method="proxy_tuning", steps=steps, **COMMON))
    recipe.setup(data)
    cached = recipe.batch_loss

    def encoding(idx):
        with torch.no_grad():
            recipe.data.codes[idx] = student.encode_images(images[idx])
        return cached(idx)

    def run(batch_loss):
        def steps_with():
            recipe.batch_loss = batch_loss
            for _ in range(steps):
                recipe.train_step()
        return steps_with

    times = alternate({"cached": run(cached), "encode_every_step": run(encoding)}, repeats, warmup=1)
    return {"times": times, **throughput(steps, times, "cached", "encode_every_step")}


def measure(kind: str, queue) -> None:
    """One memory configuration, 'lora_qkv' or 'full_qkv': steps/s and the training's peak RSS."""
    torch.set_num_threads(THREADS)
    from proxytune.tuning import TuneConfig, build_recipe

    student, _, data = training_data()
    stage2 = "lora" if kind == "lora_qkv" else "qkv"
    recipe = build_recipe(student, TuneConfig(method="two_stage", embedding_steps=0, stage2=stage2,
                                              image_tokens=False, lora_rank=16, steps=STEPS, **COMMON))
    recipe.setup(data)
    base_mb = reset_peak_rss()  # the peak from here on is the training's own
    recipe.train_step()  # warm-up (allocations, autocast caches)
    start = time.perf_counter()
    for _ in range(STEPS):
        recipe.train_step()
    elapsed = time.perf_counter() - start
    trainable = sum(p.numel() for p in recipe.params)
    queue.put({"kind": kind, "steps_per_s": STEPS / elapsed, "trainable_params": trainable,
               "rss_before_training_mb": base_mb, "peak_rss_mb": peak_rss_mb(),
               "training_peak_extra_mb": peak_rss_mb() - base_mb})


def run(kind: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(kind, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1, help="training steps per timed round of the cache comparison")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of each cache variant, alternated")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    load = os.getloadavg()
    print(f"LlamaGen-B GPT ({IMAGE}² images, 256 tokens), batch {BATCH}, bf16 autocast, {THREADS} threads; "
          f"load average {load}")
    cache = cache_speedup(args.steps, args.repeats)
    print(f"  pre-tokenised cache {cache['cached_per_s']:.3f} steps/s vs encoding every step "
          f"{cache['encode_every_step_per_s']:.3f}: {cache['ratio']:.2f}x (fastest of {args.repeats} alternated rounds "
          f"of {args.steps} steps), {cache['ratio_median']:.2f}x (median)")
    results = {kind: run(kind) for kind in ("lora_qkv", "full_qkv")}
    memory = results["full_qkv"]["training_peak_extra_mb"] - results["lora_qkv"]["training_peak_extra_mb"]
    for kind, r in results.items():
        print(f"  {kind:18s} {r['steps_per_s']:.3f} steps/s  trainable {r['trainable_params'] / 1e6:7.2f}M  "
              f"training peak +{r['training_peak_extra_mb']:.0f} MB over {r['rss_before_training_mb']:.0f} MB "
              f"({STEPS} steps, own process)")
    print(f"  full Q/K/V vs LoRA(r=16) on Q/K/V: {memory:+.0f} MB training peak RSS; load average {os.getloadavg()}")
    out = ROOT / "bench" / "results" / "tuning.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cache": cache, "results": results, "full_minus_lora_mb": memory,
                               "load_average": load, "load_average_after": os.getloadavg(), "steps": args.steps,
                               "repeats": args.repeats}, indent=2))


if __name__ == "__main__":
    main()

"""Stage `synthesize`: the tuned supervisor renders proxy images of the subject in many contexts.

Proxy-Tuning's student learns from these instead of the few references, so they must vary in scene,
accessories and properties. Every image records its prompt and seed, so it can be regenerated exactly.
"""
from __future__ import annotations

from pathlib import Path

from proxytune.diffusion import load_pipeline, sample
from proxytune.io import atomic_dir, sha256_file, write_jsonl
from proxytune.params import ProxytuneError, get, model_source
from proxytune.prompts import ACCESSORIES, PROPERTIES, RECONTEXT, subject_phrase
from proxytune.stage import stage_task

PROXY_KINDS = (RECONTEXT, ACCESSORIES, PROPERTIES)


def proxy_cycle() -> list[str]:
    """Every bank template once, each kind spread evenly through the cycle (R A P R R A P R ...), so that
    any run of prompts mixes the kinds instead of exhausting re-contextualisation first."""
    keyed = [((j + 0.5) / len(kind), k, t) for k, kind in enumerate(PROXY_KINDS) for j, t in enumerate(kind)]
    return [t for *_, t in sorted(keyed)]


def proxy_prompts(phrase: str, count: int) -> list[str]:
    """`count` prompts cycling through the bank, so every kind of context is covered evenly."""
    cycle = proxy_cycle()
    return [cycle[i % len(cycle)].format(phrase) for i in range(count)]


def run(params: dict, log) -> dict:
    """Write `outputs/synthesize/images/*.png` and `manifest.jsonl` (file, prompt, seed, sha256)."""
    s = params["synthesize"]
    count = int(s["num_images"])
    if count < 1:
        raise ProxytuneError(f"params: synthesize.num_images must be at least 1, got {count}")
    phrase = subject_phrase(get(params, "subject.identifier"), get(params, "subject.class_noun"))
    pipe = load_pipeline(model_source(params, "supervisor.model"), lora_dir="outputs/supervise")
    prompts = proxy_prompts(phrase, count)
    seeds = [int(params["seed"]) * 1_000_003 + i for i in range(count)]
    resolution = int(get(params, "prepare.resolution"))
    images = sample(pipe, prompts, seeds, int(s["sample_steps"]), float(s["guidance_scale"]),
                    resolution)
    out = Path("outputs/synthesize")
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        rows = []
        for i, (img, prompt, seed) in enumerate(zip(images, prompts, seeds)):
            rel = f"images/{i:05d}.png"
            img.save(tmp / rel)
            rows.append({"file": rel, "prompt": prompt, "seed": seed, "sha256": sha256_file(tmp / rel),
                         "steps": int(s["sample_steps"]), "guidance_scale": float(s["guidance_scale"])})
        write_jsonl(tmp / "manifest.jsonl", rows)
    log.metrics({"num_proxies": len(rows)})
    return {"images_dir": str(out / "images"), "manifest": str(out / "manifest.jsonl")}


synthesize_task = stage_task("synthesize", run)

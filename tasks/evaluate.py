"""Stage `evaluate`: student and supervisor draw held-out prompts; DreamBench metrics score them.

DINO and CLIP-I compare generations with the prepared references; CLIP-T compares each generation with
its prompt minus the identifier. The student-minus-supervisor delta is Proxy-Tuning's weak-to-strong effect.
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from ar_models import load_student
from proxytune import metrics
from proxytune.cache import cache_dir
from proxytune.diffusion import load_pipeline, sample
from proxytune.images import to_pil
from proxytune.io import atomic_dir, atomic_write_text, read_jsonl
from proxytune.params import ProxytuneError, get, local_path, model_source
from proxytune.prompts import EVAL_PROMPTS, subject_phrase
from proxytune.stage import stage_task
from tasks.distill import ADAPTER_DIR

METRICS_FILE = Path("outputs/metrics.json")


def image_grid(rows: dict[str, list[Image.Image]], cell: int) -> Image.Image:
    """One labelled row per source (references | supervisor | student)."""
    label_w, cols = 80, max(len(r) for r in rows.values())
    grid = Image.new("RGB", (label_w + cols * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows.items()):
        draw.text((4, r * cell + cell // 2 - 5), label, fill="black")
        for c, img in enumerate(images):
            grid.paste(img.convert("RGB").resize((cell, cell)), (label_w + c * cell, r * cell))
    return grid


def student_samples(params: dict, prompts: list[str]) -> list[Image.Image]:
    from peft import PeftModel

    e = params["evaluate"]
    student = load_student(params["student"])
    student.gpt = PeftModel.from_pretrained(student.gpt, str(Path("outputs/distill") / ADAPTER_DIR))
    student.eval()
    images = student.generate(prompts, cfg_scale=float(e["cfg_scale"]), temperature=float(e["temperature"]),
                              top_k=int(e["top_k"]), top_p=float(e["top_p"]), seed=int(params["seed"]))
    return to_pil(images)


def supervisor_samples(params: dict, prompts: list[str]) -> list[Image.Image]:
    pipe = load_pipeline(model_source(params, "supervisor.model"), lora_dir="outputs/supervise")
    seeds = [int(params["seed"]) * 7919 + i for i in range(len(prompts))]
    return sample(pipe, prompts, seeds, int(get(params, "supervisor.sample_steps")),
                  float(get(params, "supervisor.guidance_scale")),
                  resolution=int(get(params, "prepare.resolution")))


def run(params: dict, log) -> dict:
    """Write `outputs/metrics.json`, `outputs/evaluate/grid.png` and the generated samples."""
    e = params["evaluate"]
    identifier = get(params, "subject.identifier")
    phrase = subject_phrase(identifier, get(params, "subject.class_noun"))
    prompts = [t.format(phrase) for t in EVAL_PROMPTS[: int(e["prompts_per_model"])]]
    cache = metrics.EmbeddingCache(cache_dir("embeddings"))
    dino = metrics.DinoEmbedder(local_path(params, "evaluate.dino", "DINO model folder"), cache=cache)
    try:
        clip = metrics.ClipEmbedder(e["clip_model"], e["clip_pretrained"], config_dir=e.get("clip_config_dir"),
                                    cache=cache)
    except FileNotFoundError as err:
        raise ProxytuneError(f"params: evaluate.clip_pretrained / clip_config_dir: {err}") from None
    prepared = Path("outputs/prepare")
    references = [Image.open(prepared / r["file"]).convert("RGB") for r in read_jsonl(prepared / "captions.jsonl")]
    generated = {"supervisor": supervisor_samples(params, prompts), "student": student_samples(params, prompts)}
    clean = [metrics.strip_identifier(p, identifier) for p in prompts]
    scores = {name: metrics.dreambench_scores(images, clean, references, dino, clip)
              for name, images in generated.items()}
    scores["delta_student_minus_supervisor"] = {
        k: scores["student"][k] - scores["supervisor"][k] for k in scores["student"]}
    out = Path("outputs/evaluate")
    with atomic_dir(out) as tmp:
        for name, images in generated.items():
            (tmp / name).mkdir()
            for i, img in enumerate(images):
                img.save(tmp / name / f"{i:03d}.png")
        atomic_write_text(tmp / "prompts.json", json.dumps(prompts, indent=2))
        image_grid({"references": references, **generated}, cell=int(get(params, "prepare.resolution"))
                   ).save(tmp / "grid.png")
    atomic_write_text(METRICS_FILE, json.dumps(scores, indent=2, sort_keys=True))
    for name in ("student", "supervisor"):
        log.metrics({f"{name}.{k}": v for k, v in scores[name].items()})
    log.artifact(out / "grid.png", "grids")
    log.artifact(METRICS_FILE)
    return {"metrics": str(METRICS_FILE), "grid": str(out / "grid.png")}


evaluate_task = stage_task("evaluate", run)

"""Stage `evaluate`: student and supervisor draw the evaluation prompts; DreamBench metrics score them.

DINO and CLIP-I compare generations with the prepared references; CLIP-T compares each generation with
its prompt minus the identifier; PRES and DIV (ARBooth) are measured where asked for and possible. The
student-minus-supervisor delta is Proxy-Tuning's weak-to-strong effect. Besides the metrics JSON
it writes the per-prompt table the multi-subject benchmark aggregates (`flows/benchmark.py`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
from PIL import Image

from proxytune import metrics, reports
from proxytune.evaluation import load_evaluators, student_samples, supervisor_samples
from proxytune.io import atomic_dir, atomic_write_text, read_jsonl
from proxytune.params import get
from proxytune.prompts import EVAL_PROMPTS, class_prompt
from proxytune.reports import CACHE_STATS_FILE, TABLE_FILE

HELDOUT = [t.format("{0} {1}") for t in EVAL_PROMPTS]  # the project's held-out prompts as DreamBench templates


def eval_prompts(params: dict) -> list[str]:
    """The prompts both models draw: `evaluate.prompts` is `heldout` or a list of DreamBench templates
    (`{0}` the identifier, `{1}` the class noun), cut to the first `evaluate.prompts_per_model` (0: all)."""
    spec = get(params, "evaluate.prompts")
    templates = HELDOUT if spec == "heldout" else spec
    count = get(params, "evaluate.prompts_per_model")
    templates = templates[:count] if count else templates
    return [t.format(get(params, "subject.identifier"), get(params, "subject.class_noun")) for t in templates]


def run(params: dict, log, paths: dict[str, Path]) -> dict:
    """Write the metrics JSON (`paths["metrics"]`), `scores.csv`, `grid.png` and the samples (`paths["out"]`)."""
    notes: list[str] = []
    identifier = get(params, "subject.identifier")
    prompts = eval_prompts(params)
    e = params["evaluate"]
    per_prompt, pres_images, resize, batch = (e[k] for k in ("images_per_prompt", "pres_images", "resize",
                                                               "embed_batch_size"))
    cache, dino, clip, lpips = load_evaluators(params, notes)
    prepared, out, metrics_file = paths["prepared"], paths["out"], paths["metrics"]
    references = [Image.open(prepared / r["file"]).convert("RGB") for r in read_jsonl(prepared / "captions.jsonl")]
    drawn = [p for p in prompts for _ in range(per_prompt)]
    asked = drawn + [class_prompt(params)] * pres_images
    generated = {"supervisor": supervisor_samples(params, asked, paths["supervised"]),
                 "student": student_samples(params, asked, paths["distilled"])}

    refs = metrics.resize_policy(references, resize)
    clean = [metrics.strip_identifier(p, identifier) for p in drawn]
    rows, summary = [], {}
    for method, images in generated.items():
        scored = metrics.prompt_scores(metrics.resize_policy(images[: len(drawn)], resize), clean, refs,
                                       dino, clip, lpips, batch)
        for prompt, row in zip(prompts, scored):
            rows.append({"subject": get(params, "subject.name"), "class_noun": get(params, "subject.class_noun"),
                         "method": method, "prompt": prompt, "clip_text": row.pop("prompt"), **row})
        summary[method] = metrics.summarize(scored)
        if pres_images:
            summary[method]["pres"] = metrics.pres_score(
                metrics.resize_policy(images[len(drawn):], resize), refs, dino, batch)
    if not pres_images:
        notes.append("PRES skipped: evaluate.pres_images is 0")
    summary["delta_student_minus_supervisor"] = {k: summary["student"][k] - summary["supervisor"][k]
                                                 for k in summary["student"]}
    stats = {"hits": cache.hits, "misses": cache.misses}

    cell = max(96, int(get(params, "prepare.resolution")))  # small images are enlarged to be seen
    with atomic_dir(out) as tmp:
        for name, images in generated.items():
            (tmp / name).mkdir()
            for i, img in enumerate(images):
                img.save(tmp / name / f"{i:03d}.png")
        atomic_write_text(tmp / "prompts.json", json.dumps(asked, indent=2))
        pd.DataFrame(rows).to_csv(tmp / TABLE_FILE, index=False)
        atomic_write_text(tmp / CACHE_STATS_FILE, json.dumps(stats))
        atomic_write_text(tmp / "notes.txt", "".join(f"{n}\n" for n in notes))
        firsts = {name: images[: len(drawn) : per_prompt] for name, images in generated.items()}
        reports.image_grid({"references": references, **firsts}, cell=cell).save(tmp / "grid.png")
    atomic_write_text(metrics_file, json.dumps(summary, indent=2, sort_keys=True))
    for note in notes:
        logging.getLogger(__name__).warning(note)
    for name in ("student", "supervisor"):
        log.metrics({f"{name}.{k}": v for k, v in summary[name].items()})
    log.metrics({f"embedding_cache.{k}": v for k, v in stats.items()})
    log.artifact(out / "grid.png", "grids")
    log.artifact(out / TABLE_FILE, "tables")
    log.artifact(metrics_file)
    return {"metrics": str(metrics_file), "grid": str(out / "grid.png"), "table": str(out / TABLE_FILE)}


"""What a stage run shows on Prefect's Artifacts page, built from the outputs the stage wrote.

The stages stay free of Prefect: they return their output paths, and `publish` reads those files (metrics JSON,
manifests, loss CSVs, images) into markdown and table artifacts. Images are embedded in the markdown as data URIs,
since the UI cannot open a path on the machine that ran the stage; the path is printed beside them. Keys are
`<stage>-<subject>`, so the Artifacts page keeps one history per stage and subject.
"""
from __future__ import annotations

import base64
import io
import json
import re
import time
from pathlib import Path

import pandas as pd
from PIL import Image
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from proxytune import reports
from proxytune.io import read_jsonl
from proxytune.params import get
from proxytune.progress import Tick, clock

EMBED_LIMIT = 2_000_000  # bytes of PNG above which an image is linked, not embedded
SHEET_IMAGES = 64  # a contact sheet shows at most this many images
PROGRESS_EVERY_SECONDS = 2.0  # the API hears of a loop's progress at most this often (and at its end)


def artifact_key(stage: str, params: dict, suffix: str = "") -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    raw = "-".join(filter(None, [stage, str(get(params, "subject.name")), suffix]))
    return re.sub(r"[^a-z0-9-]+", "-", raw.lower())


class ProgressArtifact:
    """A progress artifact that follows the stage's loops (a `proxytune.progress` listener)."""

    def __init__(self, stage: str, params: dict):
        self.stage, self.last = stage, 0.0
        self.id = create_progress_artifact(0.0, key=artifact_key(stage, params, "progress"),
                                           description=f"{stage}: starting")

    def __call__(self, tick: Tick) -> None:
        now = time.monotonic()
        if tick.done < tick.total and now - self.last < PROGRESS_EVERY_SECONDS:
            return
        self.last = now
        shown = "".join(f", {k} {v:.4g}" for k, v in tick.values.items())
        update_progress_artifact(self.id, 100.0 * tick.done / max(tick.total, 1),
                                 description=f"{self.stage}: {tick.name}, {tick.unit} {tick.done}/{tick.total}{shown}, "
                                             f"{tick.rate:.2f} {tick.unit}/s, ETA {clock(tick.eta)}")

    def finish(self) -> None:
        update_progress_artifact(self.id, 100.0, description=f"{self.stage}: done")


def image_markdown(image: Image.Image, alt: str, path: Path | None = None) -> str:
    """The image inline (a data URI) with the file it shows, or only a link to it when too large."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    where = f"\n\n`{path}`" if path else ""
    if buffer.tell() > EMBED_LIMIT:
        return f"[{alt}]({Path(path).resolve().as_uri()})" if path else f"*{alt}: too large to embed*"
    return f"![{alt}](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}){where}"


def contact_sheet(files: list[Path], cell: int = 64, columns: int = 8) -> Image.Image:
    """The first SHEET_IMAGES of `files` as thumbnails, `columns` per row."""
    files = files[:SHEET_IMAGES]
    rows = max(1, -(-len(files) // columns))
    sheet = Image.new("RGB", (columns * cell, rows * cell), "white")
    for i, file in enumerate(files):
        with Image.open(file) as img:
            sheet.paste(img.convert("RGB").resize((cell, cell)), ((i % columns) * cell, (i // columns) * cell))
    return sheet


def loss_summary(loss_csv: Path) -> str:
    """Steps and the first, lowest and last loss of a training run, from its loss CSV."""
    history = pd.read_csv(loss_csv)
    if history.empty:
        return "No training steps (the method trains nothing here)."
    loss = history["loss"]
    return (f"| steps | first loss | lowest loss | last loss |\n|---:|---:|---:|---:|\n"
            f"| {int(history['step'].iloc[-1])} | {loss.iloc[0]:.4f} | {loss.min():.4f} | {loss.iloc[-1]:.4f} |\n")


def _prepare(params: dict, out: dict) -> None:
    folder = Path(out["instance_dir"]).parent
    rows = read_jsonl(Path(out["captions"]))
    sheet = contact_sheet([folder / r["file"] for r in rows])
    table = "| file | from | caption |\n|---|---|---|\n" + "".join(
        f"| {r['file']} | {r['source']} | {r['caption']} |\n" for r in rows)
    create_markdown_artifact(f"# Prepared references: {get(params, 'subject.name')}\n\n"
                             f"{image_markdown(sheet, 'references', Path(out['instance_dir']))}\n\n{table}",
                             key=artifact_key("prepare", params), description="the subject's photos, squared")


def _supervise(params: dict, out: dict) -> None:
    lora = Path(out["lora_dir"])
    classes = sorted((lora / "class_images").glob("*.png"))
    create_markdown_artifact(
        f"# Supervisor LoRA: {get(params, 'subject.name')}\n\n{loss_summary(Path(out['loss_csv']))}\n"
        f"LoRA: `{lora}`; losses: `{out['loss_csv']}`\n\n## Class images (prior preservation)\n\n"
        f"{image_markdown(contact_sheet(classes), 'class images', lora / 'class_images') if classes else 'none'}\n",
        key=artifact_key("supervise", params), description="DreamBooth-LoRA on the supervisor")


def _synthesize(params: dict, out: dict) -> None:
    folder = Path(out["manifest"]).parent
    kept, dropped = read_jsonl(folder / "manifest.jsonl"), read_jsonl(folder / "dropped.jsonl")
    summary = json.loads(Path(out["summary"]).read_text())
    sheet = contact_sheet([folder / r["file"] for r in kept])
    create_markdown_artifact(
        f"# Proxies: {get(params, 'subject.name')}\n\n{summary['kept']} kept, {summary['dropped']} dropped of "
        f"{summary['rendered']} (synthesize.min_dino: {summary['min_dino']})\n\n"
        f"{image_markdown(sheet, 'kept proxies', Path(out['images_dir']))}\n",
        key=artifact_key("synthesize", params), description="the supervisor's proxy images (contact sheet)")
    rows = sorted([{"kept": True, **r} for r in kept] + [{"kept": False, **r} for r in dropped],
                  key=lambda r: r["index"])
    create_table_artifact([{k: r.get(k) for k in ("index", "kept", "prompt", "seed", "batch", "dino")} for r in rows],
                          key=artifact_key("synthesize", params, "proxies"),
                          description="every rendered proxy, kept or dropped by synthesize.min_dino")


def _distill(params: dict, out: dict) -> None:
    s = params["student"]
    files = "".join(f"- `{Path(out['out_dir']) / f}`\n" for f in out["files"])
    create_markdown_artifact(
        f"# Student: {get(params, 'subject.name')}\n\n{s['family']} ({s['size']}), method {s['method']}, "
        f"data {s['data']}\n\n{loss_summary(Path(out['loss_csv']))}\n{files}",
        key=artifact_key("distill", params), description="the AR student tuned on the subject")


def metrics_table(metrics_file: Path) -> str:
    """Student and supervisor and their difference, the papers' columns (DINO, CLIP-I, CLIP-T, PRES, DIV)."""
    scores = json.loads(Path(metrics_file).read_text())
    rows = [{"method": "supervisor", **scores["supervisor"]}, {"method": "student", **scores["student"]},
            {"method": reports.DELTA, **scores["delta_student_minus_supervisor"]}]
    return reports.to_markdown(reports.paper_table(pd.DataFrame(rows)))


def _evaluate(params: dict, out: dict) -> None:
    with Image.open(out["grid"]) as grid:
        shown = image_markdown(grid, "references | supervisor | student", Path(out["grid"]))
    create_markdown_artifact(
        f"# DreamBench metrics: {get(params, 'subject.name')}\n\n{metrics_table(Path(out['metrics']))}\n"
        f"Per prompt: `{out['table']}`\n\n## References | supervisor | student\n\n{shown}\n",
        key=artifact_key("evaluate", params), description="student vs supervisor (DINO, CLIP-I, CLIP-T)")


def _bootstrap(params: dict, out: dict) -> None:
    models = sorted(p.name for p in Path(out["models"]).iterdir() if p.is_dir())
    create_markdown_artifact(
        "# Embedded default\n\n" + "".join(f"- `{Path(out['models']) / m}`\n" for m in models)
        + f"\nDemo photos: `{out['demo_subject']}`\n", key=artifact_key("bootstrap", params),
        description="tiny random-init models and the demo subject")


PUBLISHERS = {"bootstrap": _bootstrap, "prepare": _prepare, "supervise": _supervise, "synthesize": _synthesize,
              "distill": _distill, "evaluate": _evaluate}


def publish(stage: str, params: dict, outputs: dict) -> None:
    """The artifacts of `stage` from its outputs (`outputs`: what the stage's run returned)."""
    PUBLISHERS[stage](params, outputs)

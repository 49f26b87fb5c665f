"""Evaluation reports: the per subject x prompt table, the papers' aggregate table, grids and a bar chart.

The per-prompt table is the source of truth (one row per subject, method and prompt, with the number of
images behind each score); every aggregate is an image-weighted mean of it, so a subject with four images
per prompt and one with one image per prompt weigh as their image counts say, exactly as scoring all images
at once would.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd
from PIL import Image, ImageDraw

TABLE_FILE = "scores.csv"  # per-prompt scores of one evaluation, what the benchmark aggregates
CACHE_STATS_FILE = "embedding_cache.json"  # embedding-cache hits and misses of one evaluation
METRICS = ("dino", "clip_i", "clip_t", "pres", "div")
HEADERS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "pres": "PRES", "div": "DIV"}
DELTA = "student - supervisor"


def _weighted(group: pd.DataFrame) -> pd.Series:
    out = {}
    for m in METRICS:
        if m in group and group[m].notna().any():
            ok = group[group[m].notna()]
            out[m] = (ok[m] * ok["images"]).sum() / ok["images"].sum()
    return pd.Series(out, dtype=float)


def aggregate(table: pd.DataFrame, by: Sequence[str] = ("method",)) -> pd.DataFrame:
    """Image-weighted means of the per-prompt `table` (columns: method, images, metrics...) grouped `by`."""
    cols = [m for m in METRICS if m in table]
    return table.groupby(list(by), sort=True)[["images", *cols]].apply(_weighted).reset_index()


def with_delta(summary: pd.DataFrame) -> pd.DataFrame:
    """Append the student-minus-supervisor row (Proxy-Tuning's weak-to-strong effect) when both are there."""
    rows = summary.set_index("method")
    if not {"student", "supervisor"} <= set(rows.index):
        return summary
    delta = (rows.loc["student"] - rows.loc["supervisor"]).to_frame().T.assign(method=DELTA)
    return pd.concat([summary, delta[summary.columns]], ignore_index=True)


def paper_table(summary: pd.DataFrame) -> pd.DataFrame:
    """method | DINO | CLIP-I | CLIP-T (| PRES | DIV where measured), the layout the papers print."""
    cols = [m for m in METRICS if m in summary and summary[m].notna().any()]
    return summary[["method", *cols]].rename(columns={"method": "Method", **HEADERS})


def to_markdown(table: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub-markdown table (written here rather than pulling in `tabulate` for one function)."""
    def cell(v):
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |",
             "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(t) else "---" for t in table.dtypes) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def image_grid(rows: dict[str, list[Image.Image]], cell: int, label_width: int = 96) -> Image.Image:
    """One labelled row per source (references | supervisor | student), one cell per image."""
    cols = max(len(r) for r in rows.values())
    grid = Image.new("RGB", (label_width + cols * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows.items()):
        draw.text((4, r * cell + cell // 2 - 5), label, fill="black")
        for c, img in enumerate(images):
            grid.paste(img.convert("RGB").resize((cell, cell)), (label_width + c * cell, r * cell))
    return grid


def bar_chart(table: pd.DataFrame, path: str | Path, label: str = "Method") -> Path:
    """Grouped bars: one group per metric column, one bar per row of `table` (a run or a method)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here or on a server
    import matplotlib.pyplot as plt

    metrics = [c for c in table.columns if c != label and pd.api.types.is_numeric_dtype(table[c])]
    width = 0.8 / max(len(table), 1)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(metrics), 3.6))
    for i, (name, values) in enumerate(zip(table[label], table[metrics].to_numpy(dtype=float))):
        ax.bar([j + i * width for j in range(len(metrics))], values, width, label=str(name))
    ax.set_xticks([j + width * (len(table) - 1) / 2 for j in range(len(metrics))], metrics)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("score")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

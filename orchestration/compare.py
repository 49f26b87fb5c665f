"""`python -m orchestration.compare`: scored runs side by side, from MLflow, as one table and a bar chart.

A row per (run, method): every pipeline run (its parent run, one subject, named after what differs) and every
benchmark run (many subjects), with DINO / CLIP-I / CLIP-T (and PRES / DIV where measured) as each logged them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from orchestration import tracking
from proxytune import reports

METHODS = ("supervisor", "student", "delta")


def runs_table(filter_string: str = "", max_runs: int = 50) -> pd.DataFrame:
    """Scored runs of the project's experiment, newest first, one row per (run, method)."""
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    runs = mlflow.search_runs(experiment_names=[tracking.EXPERIMENT], filter_string=filter_string,
                              order_by=["attributes.start_time DESC"], max_results=max_runs, output_format="pandas")
    rows = []
    for _, run in runs.iterrows():
        if "tags.proxytune.benchmark" in run and run["tags.proxytune.benchmark"] == "true":
            label = f"{run['tags.mlflow.runName']} ({run['tags.subjects']})"
        elif run.get(f"tags.{tracking.PARENT_TAG}") == "true":
            label = f"{run['tags.mlflow.runName']} {run['run_id'][:8]}"
        else:
            continue
        for method in METHODS:
            scores = {m: run.get(f"metrics.{method}.{m}") for m in reports.METRICS}
            if pd.notna(scores["dino"]):
                rows.append({"run": label, "method": method, "run_id": run["run_id"], **scores})
    table = pd.DataFrame(rows, columns=["run", "method", "run_id", *reports.METRICS])
    return table.dropna(axis=1, how="all")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestration.compare", description=__doc__)
    parser.add_argument("--filter", default="", help="MLflow search filter, e.g. \"params.student.size = 'B'\"")
    parser.add_argument("--max-runs", type=int, default=50)
    parser.add_argument("--out", default="outputs/compare", help="folder for compare.csv/.md/.png")
    args = parser.parse_args(argv)
    table = runs_table(args.filter, args.max_runs)
    if table.empty:
        print("error: no scored runs found (run the pipeline or flows.benchmark first)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "compare.csv", index=False)
    shown = table[table["method"] != "delta"].assign(Method=lambda t: t["run"] + " / " + t["method"])
    paper = shown[["Method", *[m for m in reports.METRICS if m in shown]]].rename(columns=reports.HEADERS)
    (out / "compare.md").write_text(reports.to_markdown(paper))
    reports.bar_chart(paper, out / "compare.png")
    print(reports.to_markdown(paper))
    print(f"wrote {out / 'compare.csv'}, {out / 'compare.md'}, {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

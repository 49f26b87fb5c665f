"""Printed at the end of `make demo`: where every output of the run is, and the headline metrics."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from orchestration.cache import stage_paths
from orchestration.tracking import tracking_uri


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m orchestration.summary", description=__doc__).parse_args(argv)
    root = Path.cwd()
    supervise, distill, evaluate = (stage_paths(stage, root) for stage in ("supervise", "distill", "evaluate"))
    metrics = evaluate["metrics"]
    print("\nproxytune demo finished. Outputs:")
    print(f"  metrics       {metrics}   (dvc metrics show)")
    print(f"  image grid    {evaluate['out'] / 'grid.png'}   (references | supervisor | student)")
    print(f"  loss curves   {supervise['loss_csv']}, {distill['loss_csv']}   (dvc plots show)")
    print(f"  adapters      {supervise['out']}, {distill['out']}")
    print(f"  MLflow store  {tracking_uri()}   (mlflow ui --backend-store-uri {tracking_uri()}, then open "
          "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning)")
    print(f"  Prefect       {os.environ.get('PREFECT_HOME', root / '.prefect')}   (open the server make demo left running, else make prefect-server; stop it: python -m orchestration.server --stop)")
    if metrics.is_file():
        scores = json.loads(metrics.read_text())
        print("\n  model        DINO    CLIP-I  CLIP-T")
        for name in ("supervisor", "student"):
            s = scores[name]
            print(f"  {name:<11}  {s['dino']:.3f}   {s['clip_i']:.3f}   {s['clip_t']:.3f}")
    return 0


if __name__ == "__main__":
    main()

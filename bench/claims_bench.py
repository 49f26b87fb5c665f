"""The papers' claims in the miniature world: every arm of `testbed.claims` on 3 world subjects x
3 seeds with the project's params.yaml settings and the shipped world-pretrained models (models/world), then
the table (a)-(d) as mean ± spread over seeds. Prints it and writes bench/results/claims.{md,csv}.

    python bench/claims_bench.py                       # about 40 min on a 2-core CPU
    python bench/claims_bench.py --subjects 0 --seeds 0 1 --arms untuned proxy_tuning
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from flows import claims as claims_runner
from proxytune.io import atomic_write_text
from proxytune.params import load_params
from testbed import claims

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
CLAIMS = """\
(a) Proxy-Tuning: proxy_tuning vs references (student on the 4 photos) vs supervisor (weak-to-strong)
(b) Sun et al.: embedding_only vs two_stage
(c) ARBooth: arbooth vs arbooth_no_prior (PRES: lower = less drift of the class prompt toward the subject)
(d) untuned student (floor) and the world's own renders (ceiling)"""


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, nargs="+", default=list(claims.ClaimsConfig.subjects))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(claims.ClaimsConfig.seeds))
    parser.add_argument("--arms", nargs="+", default=list(claims.ARMS), choices=list(claims.ARMS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = claims.ClaimsConfig(subjects=tuple(args.subjects), seeds=tuple(args.seeds), arms=tuple(args.arms))
    work = Path(tempfile.mkdtemp(prefix="proxytune-claims-"))
    os.environ.setdefault("PROXYTUNE_CACHE", str(work / "cache"))
    start = time.perf_counter()
    rows = claims_runner.run(load_params(REPO / "params.yaml"), config, work)
    minutes = (time.perf_counter() - start) / 60
    text = (f"World subjects {list(config.subjects)}, seeds {list(config.seeds)}; mean ± spread (std over seeds "
            f"of the mean over subjects); {minutes:.0f} min.\n\n{claims.markdown(rows)}\n\n{CLAIMS}\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows.to_csv(RESULTS / "claims.csv", index=False)
    atomic_write_text(RESULTS / "claims.md", text)
    print(text)
    return text


if __name__ == "__main__":
    main()

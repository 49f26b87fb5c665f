"""The papers' claims in the miniature world: every arm of `testbed.claims` on 3 world subjects x
3 seeds with the project's params.yaml settings and the shipped world-pretrained models (models/world), then
the table (a)-(d) as mean ± spread over seeds and each claim's verdict. First the gate on the base models (the
supervisor must follow prompts better than the untuned student); after the table the DreamBooth part (the tuned
supervisor must carry more of the subject than the reference-tuned student). A failed gate is said plainly and
the claims still run, so the table shows why. Prints it all and writes bench/results/claims.{md,csv}.

    python bench/claims_bench.py                       # every core: one (subject, seed) per process
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


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, nargs="+", default=list(claims.ClaimsConfig.subjects))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(claims.ClaimsConfig.seeds))
    parser.add_argument("--arms", nargs="+", default=list(claims.ARMS), choices=list(claims.ARMS))
    parser.add_argument("--var-preset", default=claims.VAR_PRESET, help="the next-scale arms' student preset")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="(subject, seed) pairs run in parallel, one process and thread each")
    args = parser.parse_args(argv)
    config = claims.ClaimsConfig(subjects=tuple(args.subjects), seeds=tuple(args.seeds), arms=tuple(args.arms),
                                 var_preset=args.var_preset)
    work = Path(tempfile.mkdtemp(prefix="proxytune-claims-"))
    os.environ.setdefault("PROXYTUNE_CACHE", str(work / "cache"))
    params = load_params(REPO / "params.yaml")
    claims.check_arms(params, config)
    start = time.perf_counter()
    base = f"## Gate: base models\n\n{claims.gate_markdown(claims.base_gate(params, config))}\n"
    print(base, flush=True)
    rows = claims_runner.run(params, config, work, workers=args.workers)
    minutes = (time.perf_counter() - start) / 60
    dreambooth = claims.dreambooth_gate(rows)
    text = (f"World subjects {list(config.subjects)}, seeds {list(config.seeds)}; mean ± spread (std over seeds "
            f"of the mean over subjects); {minutes:.0f} min.\n\n{base}\n## Claims\n\n{claims.markdown(rows)}\n\n"
            + (f"## Gate: DreamBooth\n\n{claims.gate_markdown(dreambooth)}\n\n" if dreambooth else "")
            + f"## Verdicts (a claim reproduces when its difference exceeds the larger spread)\n\n"
            f"{claims.verdicts_markdown(claims.verdicts(rows))}\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows.to_csv(RESULTS / "claims.csv", index=False)
    atomic_write_text(RESULTS / "claims.md", text)
    print(text)
    return text


if __name__ == "__main__":
    torch.set_num_threads(1)  # the base gate as each worker runs: one thread, no spin-waiting on a busy CPU
    main()

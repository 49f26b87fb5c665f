"""How much of the subject the DreamBooth supervisor learns, and whether it draws it in new scenes, as its recipe
changes: a sensitivity study, not a tuning.

Each setting differs from params.yaml only in the `supervisor` and `subject` keys it names; every one runs the
claims runner's `supervisor` arm (DreamBooth on the subject's 4 references, then the evaluation prompts drawn and
scored) on the same 3 world subjects x 3 seeds as the claims table. Prints mean ± spread per setting and
writes bench/results/supervisor_sensitivity.{csv,md}.

    python bench/supervisor_sensitivity.py [--workers 2]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
# The family's attention projections plus the transformer blocks' feed-forward and every resnet's two convolutions.
WIDE = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
LORA_ALONE = {"pivotal_tokens": 0}
PHOTO = {"caption": "a photo of {}"}  # DreamBooth's caption, a phrase the world's text encoders never saw
# Per setting: its `supervisor` keys, then its `subject` keys, over params.yaml's.
SETTINGS = {
    "pivotal tokens + LoRA, world caption (params.yaml)": ({}, {}),
    "pivotal tokens + LoRA, 'a photo of' caption": ({}, PHOTO),
    "LoRA alone, world caption": (LORA_ALONE, {}),
    "LoRA alone, 'a photo of' caption (the former default)": (LORA_ALONE, PHOTO),
    "LoRA alone, 'a photo of', rank 16": ({**LORA_ALONE, "lora_rank": 16, "lora_alpha": 16}, PHOTO),
    "LoRA alone, 'a photo of', + text encoder": ({**LORA_ALONE, "train_text_encoder": True}, PHOTO),
    "LoRA alone, 'a photo of', rank 16 + ff + convs": (
        {**LORA_ALONE, "lora_rank": 16, "lora_alpha": 16, "target_modules": WIDE}, PHOTO),
    "LoRA alone, 'a photo of', no prior preservation": ({**LORA_ALONE, "prior_preservation": False}, PHOTO),
    "LoRA alone, 'a photo of', 400 steps": ({**LORA_ALONE, "steps": 400}, PHOTO),
}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="(subject, seed) pairs run at once (default: 2)")
    parser.add_argument("--setting", action="append", choices=list(SETTINGS), help="only this one (repeatable)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="supervisor-sensitivity-"))
    os.environ.setdefault("PROXYTUNE_CACHE", str(work / "cache"))
    sys.path.insert(0, str(REPO))
    from flows import claims as runner
    from proxytune.params import load_params
    from testbed import claims

    base = load_params(REPO / "params.yaml")
    tables = []
    for name, (supervisor, subject) in SETTINGS.items():
        if args.setting and name not in args.setting:
            continue
        params = copy.deepcopy(base)
        params["supervisor"].update(supervisor)
        params["subject"].update(subject)
        rows = runner.run(params, claims.ClaimsConfig(arms=("supervisor",)), work / f"s{len(tables)}", args.workers)
        tables.append(rows.assign(arm=name))
        print(f"{name}: done", flush=True)
    rows = pd.concat(tables, ignore_index=True)
    table = claims.markdown(rows)
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    rows.to_csv(out / "supervisor_sensitivity.csv", index=False)
    (out / "supervisor_sensitivity.md").write_text(table + "\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()

"""The benchmark table: every figure the project sets a goal for, and every peer row, from bench/results/*.json.

`make bench` prints it after running the benches; `python bench/report.py` prints it from whatever results are
there (a bench not run yet shows as such). Each figure is a ratio its bench measured side by side in one run;
`met` compares it with the goal, so a regression shows here rather than in a timed test.
"""
from __future__ import annotations

import json
import operator
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
AT_LEAST, AT_MOST = (operator.ge, ">="), (operator.le, "<=")


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def dig(data: dict | None, *keys):
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def ratio_rows() -> list[tuple[str, str, float | None, str, tuple, float]]:
    """(figure, bench, value, how it is shown, goal comparison, goal value) for the project's own ratios."""
    sampling, tuning, supervise = load("sampling"), load("tuning"), load("supervise")
    synthesize, evaluate, orchestration, install = load("synthesize"), load("evaluate"), load("orchestration"), \
        load("install")
    rows = []
    for dtype in ("fp32", "bf16"):
        rows.append((f"KV cache vs recompute, LlamaGen-B, 256 tokens, {dtype}", "sampling",
                     dig(sampling, "speedup_cache_batch1", dtype), "x", AT_LEAST, 5.0))
    for dtype, key in (("fp32", "fp32, 1 prompt(s)"), ("bf16", "bf16 autocast, 1 prompt(s)")):
        rows.append((f"decode step / bandwidth bound, 2 rows, {dtype}", "sampling",
                     dig(sampling, "decode_step", key, "actual_over_bound"), "x", AT_MOST, 1.5))
    rows.append(("tuning, pre-tokenised cache vs encoding each step", "tuning", dig(tuning, "cache", "ratio"), "x",
                 AT_LEAST, 2.0))
    for family in (dig(supervise, "families") or {"sd": None, "flux": None}):
        rows.append((f"supervisor steps/s, cached latents vs not, {family}", "supervise",
                     dig(supervise, "families", family, "ratio"), "x", AT_LEAST, 1.5))
    rows.append(("batched proxy synthesis vs one at a time", "synthesize", dig(synthesize, "batching", "speedup"),
                 "x", AT_LEAST, 2.0))
    cold, warm = dig(evaluate, "rescore_cold_s"), dig(evaluate, "rescore_warm_s")
    rows.append(("re-evaluation, warm embedding cache / cold, tiny evaluators", "evaluate",
                 warm / cold if cold and warm else None, "%", AT_MOST, 0.05))
    rows.append(("re-embedding, warm cache / cold, DINO at ViT-S/16 size", "evaluate",
                 dig(evaluate, "rescore_dino_vits16_size", "warm_over_cold"), "%", AT_MOST, 0.05))
    rerun = dig(orchestration, "cached_rerun_s")
    rows.append(("stage start-up, cached re-run, mean s", "orchestration",
                 sum(rerun.values()) / len(rerun) if rerun else None, "s", AT_MOST, 3.0))
    rows.append(("orchestration share of the demo (dvc repro vs one process)", "orchestration",
                 dig(orchestration, "orchestration_share"), "%", AT_MOST, 0.10))
    rows.append(("fresh clone `make demo`, install included, s", "install_time --demo, not in make bench",
                 dig(install, "fresh_clone_demo", "total_s"), "s", AT_MOST, 300.0))
    return rows


def peer_rows() -> list[tuple[str, float, float]]:
    """(row, ratio from the fastest runs, ratio from the medians): ours / the peer's throughput."""
    peers = load("peers") or {}
    rows = []
    for section, entries in peers.items():
        if isinstance(entries, dict):
            rows += [(f"{section} {name}", r["ratio"], r["ratio_median"]) for name, r in entries.items()
                     if isinstance(r, dict) and "ratio" in r]
    return rows


def shown(value: float, unit: str) -> str:
    return {"x": f"{value:.2f}x", "%": f"{value:.1%}", "s": f"{value:.1f} s"}[unit]


def main() -> None:
    print(f"\n{'figure':<62}{'now':>10}{'goal':>11}  met   (bench)")
    for figure, bench, value, unit, (compare, sign), goal in ratio_rows():
        now = "not run" if value is None else shown(value, unit)
        met = "" if value is None else ("yes" if compare(value, goal) else "NO")
        print(f"{figure:<62}{now:>10}{sign + ' ' + shown(goal, unit):>11}  {met:<5} ({bench})")
    rows = peer_rows()
    print(f"\n{'peer row: ours / peer throughput (> 1: ahead)':<62}{'fastest':>10}{'median':>10}")
    for name, fastest, median in rows:
        print(f"{name:<62}{fastest:>9.2f}x{median:>9.2f}x")
    if not rows:
        print("(bench/peers_bench.py not run yet)")


if __name__ == "__main__":
    main()

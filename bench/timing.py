"""Timing implementations side by side in one process, for the benches: the sides run in turn, round after round,
so a change of load on the shared machine hits each alike; throughput from each side's fastest round and from
its median round."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternate(sides: dict[str, Callable[[], object]], repeats: int, warmup: int = 0,
              check: Callable[..., None] | None = None) -> dict[str, dict]:
    """Every callable runs `warmup` untimed rounds, then `repeats` timed ones, in turn; the seconds of each.
    `check(*outputs)` asserts the first timed round's outputs (in the order of `sides`) agree, before any time is
    reported."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    times = {name: [] for name in sides}
    for i in range(repeats):
        outputs = []
        for name, fn in sides.items():
            start = time.perf_counter()
            outputs.append(fn())
            times[name].append(time.perf_counter() - start)
        if i == 0 and check is not None:
            check(*outputs)
    return {name: {"min_s": min(t), "median_s": statistics.median(t), "all_s": t} for name, t in times.items()}


def throughput(work: float, times: dict[str, dict], a: str, b: str) -> dict:
    """`work` per second of sides `a` and `b`, from the fastest round and the median, and the ratio a / b of each."""
    r = {}
    for side in (a, b):
        r[f"{side}_per_s"] = work / times[side]["min_s"]
        r[f"{side}_per_s_median"] = work / times[side]["median_s"]
    r["ratio"] = r[f"{a}_per_s"] / r[f"{b}_per_s"]
    r["ratio_median"] = r[f"{a}_per_s_median"] / r[f"{b}_per_s_median"]
    return r

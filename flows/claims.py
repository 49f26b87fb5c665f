"""The claims runner: for each world subject and seed, the real stages, then every arm drawn and scored.

Wiring only: the arms, their scoring and the claims table are `testbed.claims`; the stages are `tasks/`. Each
(subject, seed) keeps its stages' data, laid out as in dvc.yaml, and a grid.png of what each arm drew in
`work/subject<i>-seed<s>/`.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import torch

from orchestration.cache import stage_paths
from proxytune.params import ProxytuneError
from tasks import distill, prepare, supervise, synthesize
from testbed import claims


def run_subject_seed(base: dict, index: int, seed: int, config: claims.ClaimsConfig, work: Path) -> list[dict]:
    """Every arm of `config` for one (subject, seed): one row per arm with its mean scores."""
    params = claims.subject_params(base, index, seed, work)
    paths = {name: stage_paths(name, work) for name in ("prepare", "supervise", "synthesize", "distill")}
    prepare.run(params, claims.NoLog(), paths["prepare"])
    if claims.needs_supervisor(config.arms):
        supervise.run(params, claims.NoLog(), paths["supervise"])
        synthesize.run(params, claims.NoLog(), paths["synthesize"])
    scorer, rows = claims.ArmScorer(params, index, config, paths), []
    for arm in config.arms:
        arm_params = claims.arm_params(params, arm, config.var_preset)
        if claims.tuned(arm):
            distill.run(arm_params, claims.NoLog(), paths["distill"])
        rows.append(scorer.score(arm, arm_params))
    scorer.grid().save(work / "grid.png")
    return rows


def _one_thread_subject_seed(*args) -> list[dict]:
    torch.set_num_threads(1)
    return run_subject_seed(*args)


def run(base: dict, config: claims.ClaimsConfig, work: Path, workers: int = 1) -> pd.DataFrame:
    """All subjects x seeds x arms; one row per (subject, seed, arm), in subject-then-seed order. With
    `workers` > 1 the (subject, seed) pairs run in that many processes of one torch thread each: the pairs are
    independent, so N cores finish the table about N times sooner."""
    claims.check_arms(base, config)
    if workers < 1:
        raise ProxytuneError(f"workers: must be >= 1, got {workers}")
    jobs = [(base, index, seed, config, work / f"subject{index}-seed{seed}")
            for index in config.subjects for seed in config.seeds]
    if workers == 1:
        return pd.DataFrame([row for job in jobs for row in run_subject_seed(*job)])
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pd.DataFrame([row for rows in pool.map(_one_thread_subject_seed, *zip(*jobs)) for row in rows])

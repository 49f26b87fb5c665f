"""The papers' claims, measured in the miniature world.

For each world subject (`world.make_subject`) and seed, the real stages run with their data in a work folder
(`flows/claims.py` wires them):
prepare the subject's 4 reference renders, DreamBooth the world-pretrained supervisor, synthesise proxies; then
every *arm* (a way to personalise the student, or a reference point) draws the evaluation prompts and is scored
with the world's DINO / CLIP-I / CLIP-T, plus PRES (the class prompt's drift toward the subject) for students:

    untuned           the pretrained student, prompted with the identifier it has never seen (floor, claim d)
    world             the world's own renders of the subject in each prompt's context (ceiling, claim d)
    supervisor        the DreamBooth supervisor (claim a: weak-to-strong)
    proxy_tuning      the student tuned on the supervisor's proxies (claim a)
    references        the student tuned directly on the 4 references (claim a)
    embedding_only    Sun et al.'s stage 1 alone: the identifier embedding (claim b)
    two_stage         Sun et al.'s two stages (claim b)
    arbooth_no_prior  ARBooth without prior distillation (claim c)
    arbooth           ARBooth with prior distillation (claim c)

Arms differ from the base params only in `student` settings, so one supervisor and one proxy set serve all of
a (subject, seed)'s arms; its work folder keeps a grid.png of what each arm drew (the evaluation prompts, then
the class prompt for PRES). `table` reduces the rows to mean +- spread, where the spread is the standard deviation
over seeds of the per-seed mean across subjects: the seed-to-seed spread the claims must beat.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from proxytune import metrics, reports
from proxytune.evaluation import class_prompt, load_evaluators, student_sampling, supervisor_samples
from proxytune.images import to_pil
from proxytune.io import read_jsonl
from proxytune.prompts import EVAL_PROMPTS
from proxytune.tuning import load_tuned
from testbed import world

# Per arm: the `student` settings it changes (None: not a tuned student).
ARMS: dict[str, dict | None] = {
    "untuned": None,
    "world": None,
    "supervisor": None,
    "proxy_tuning": {"method": "proxy_tuning", "data": "proxies"},
    "references": {"method": "proxy_tuning", "data": "references"},
    "embedding_only": {"method": "two_stage", "data": "references", "two_stage": {"stage2": "none"}},
    "two_stage": {"method": "two_stage", "data": "references", "two_stage": {"stage2": "lora"}},
    "arbooth_no_prior": {"method": "arbooth", "data": "proxies", "arbooth": {"prior_weight": 0.0}},
    "arbooth": {"method": "arbooth", "data": "proxies"},
}
STUDENT_ARMS = ("untuned", *(a for a, s in ARMS.items() if s))
METRICS = ("dino", "clip_i", "clip_t", "clip_t_scenes", "pres")
SCENE_PROMPTS = tuple(t for t in EVAL_PROMPTS if world.apply_template(world.make_subject(0), t).scene)
REFERENCE_SEED = 0  # the subject's photos stay the same across seeds: seeds vary training and sampling


@dataclass
class ClaimsConfig:
    subjects: tuple[int, ...] = (0, 1, 2)
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = tuple(ARMS)
    images_per_prompt: int = 4  # DreamBooth's protocol
    pres_images: int = 4


class NoLog:
    """The stages log to MLflow through this interface; claims runs keep their numbers in the table instead."""

    def metrics(self, values, step=None):
        pass

    def artifact(self, path, folder=None):
        pass


def _merge(base: dict, change: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in change.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def subject_params(base: dict, index: int, seed: int, work: Path) -> dict:
    """The base params for world subject `index` at `seed`, its reference photos written into `work`."""
    subject = world.make_subject(index)
    size = int(base["prepare"]["resolution"])
    images = work / "references"
    if not images.is_dir():
        world.subject_references(subject, 4, REFERENCE_SEED, images, size)
    params = copy.deepcopy(base)
    params["seed"] = seed
    params["subject"] = {**params["subject"], "name": f"world_{index}", "images": str(images.resolve()),
                         "class_noun": subject.class_noun}
    params["evaluate"] = {**params["evaluate"], "prompts": "heldout", "prompts_per_model": 0}
    return params


def _drawer(arm: str, params: dict, subject: world.Spec, lora_dir: Path, distilled: Path):
    """`draw(prompts, templates)` for `arm`, its model loaded once (distill has already run for tuned arms)."""
    from ar_models import load_student

    if arm == "world":
        size, seed = int(params["prepare"]["resolution"]), int(params["seed"])
        return lambda prompts, templates: [world.render(world.apply_template(subject, t), seed * 7919 + i, size)
                                           for i, t in enumerate(templates)]
    if arm == "supervisor":
        return lambda prompts, templates: supervisor_samples(params, prompts, lora_dir)
    model = load_student(params["student"]) if arm == "untuned" else load_tuned(distilled, params["student"])

    def draw(prompts, templates):
        with torch.inference_mode():
            return to_pil(model.generate(prompts, **student_sampling(params)))

    return draw


def arm_params(params: dict, arm: str) -> dict:
    """The params an arm runs with: the base params with the arm's `student` settings."""
    return _merge(params, {"student": ARMS[arm]}) if ARMS.get(arm) else params


class ArmScorer:
    """Draws and scores the arms of one (subject, seed): references, evaluators and prompts are loaded once, and
    what each arm drew is kept for the grid."""

    def __init__(self, params: dict, index: int, config: ClaimsConfig, paths: dict[str, dict[str, Path]]):
        self.params, self.index, self.config = params, index, config
        self.lora_dir, self.distilled = paths["supervise"]["out"], paths["distill"]["out"]
        _, self.dino, self.clip, _ = load_evaluators(params, [])
        prepared = paths["prepare"]["out"]
        self.refs = [Image.open(prepared / r["file"]).convert("RGB") for r in read_jsonl(prepared / "captions.jsonl")]
        identifier, noun = params["subject"]["identifier"], params["subject"]["class_noun"]
        self.templates = [t for t in EVAL_PROMPTS for _ in range(config.images_per_prompt)]
        self.prompts = [t.format(f"{identifier} {noun}") for t in self.templates]
        self.clean = [metrics.strip_identifier(p, identifier) for p in self.prompts]
        self.shown = {"photos": self.refs}

    def score(self, arm: str, params: dict) -> dict:
        """One row: the arm's mean scores on the evaluation prompts, scene CLIP-T and, for students, PRES."""
        config, n = self.config, len(self.prompts)
        draw = _drawer(arm, params, world.make_subject(self.index), self.lora_dir, self.distilled)
        images = draw(self.prompts, self.templates)
        if arm in STUDENT_ARMS and config.pres_images:  # its own call: the scored samples do not depend on it
            images += draw([class_prompt(params)] * config.pres_images, [])
        scored = metrics.prompt_scores(images[:n], self.clean, self.refs, self.dino, self.clip)
        scenes = [r for r, t in zip(scored, dict.fromkeys(self.templates)) if t in SCENE_PROMPTS]
        row = {"subject": self.index, "seed": int(params["seed"]), "arm": arm, **metrics.summarize(scored),
               "clip_t_scenes": metrics.summarize(scenes)["clip_t"]}
        self.shown[arm] = images[:n:config.images_per_prompt] + images[n:]
        if arm in STUDENT_ARMS and config.pres_images:
            row["pres"] = metrics.pres_score(images[n:], self.refs, self.dino)
        return {k: row.get(k) for k in ("subject", "seed", "arm", *METRICS)}

    def grid(self) -> Image.Image:
        return reports.image_grid(self.shown, cell=64)


def per_seed(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean over subjects for each (arm, seed): the unit whose spread the claims are judged against."""
    return rows.groupby(["arm", "seed"], sort=False)[list(METRICS)].mean().reset_index()


def table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per arm: mean and spread (std over seeds of the per-seed means) of each metric."""
    seeds = per_seed(rows).groupby("arm", sort=False)[list(METRICS)]
    mean, spread = seeds.mean(), seeds.std(ddof=0)
    return pd.concat({"mean": mean, "spread": spread}, axis=1)


def markdown(rows: pd.DataFrame) -> str:
    """The claims table: one line per arm, `mean ± spread` per metric (— where a metric does not apply)."""
    t = table(rows)
    lines = ["| arm | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for arm in t.index:
        cells = []
        for m in METRICS:
            mean, spread = t.loc[arm, ("mean", m)], t.loc[arm, ("spread", m)]
            cells.append("—" if pd.isna(mean) else f"{mean:.3f} ± {spread:.3f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

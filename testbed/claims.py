"""The papers' claims, measured in the miniature world.

For each world subject (`world.make_subject`) and seed, the real stages run with their data in a work folder
(`flows/claims.py` wires them):
prepare the subject's 4 reference renders, DreamBooth the world-pretrained supervisor, synthesise proxies; then
every *arm* (a way to personalise the student, or a reference point) draws the evaluation prompts and is scored
with the world's DINO / CLIP-I / CLIP-T, plus PRES (the class prompt's drift toward the subject) for students.
Each arm trains on the data its paper used:

    untuned           the pretrained student, prompted with the identifier it has never seen (floor, claim d)
    world             the world's own renders of the subject in each prompt's context (ceiling, claim d)
    supervisor        the DreamBooth supervisor (claim a: weak-to-strong)
    proxy_tuning      the student tuned on the supervisor's proxies (claim a)
    references        the student tuned directly on the 4 references (claim a)
    augmented         the same on augmented references, Proxy-Tuning's augmentation baseline (claim a)
    embedding_only    Sun et al.'s stage 1 alone on the references: the identifier embedding (claim b)
    two_stage         Sun et al.'s two stages on the references (claim b)
    two_stage_proxies Sun et al.'s two stages on the supervisor's proxies: the project's own chain (claim a)
    arbooth_no_prior  ARBooth on the references without prior distillation (claim c)
    arbooth           ARBooth on the references with prior distillation on the base model's class samples (claim c)
    untuned_var       the next-scale (VAR) student untuned: its floor
    arbooth_var       ARBooth on the VAR student with the scale-wise loss (claim c)
    arbooth_var_flat  the same with uniform scale weights (claim c: what the scale-wise loss adds)

Arms differ from the base params only in `student` settings, so one supervisor and one proxy set serve all of
a (subject, seed)'s arms; its work folder keeps a grid.png of what each arm drew (the evaluation prompts, then
the class prompt for PRES). `table` reduces the rows to mean +- spread, where the spread is the standard deviation
over seeds of the per-seed mean across subjects: the seed-to-seed spread the claims must beat. `verdicts` applies
that rule to each claim; `base_gate` and `dreambooth_gate` check the premise of the claims, a supervisor that
draws better than its student.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from ar_models import load_student
from ar_models.loading import pick
from ar_models.var import PATCH_NUMS_256, VAR_SIZES
from orchestration import presets
from proxytune import metrics, reports
from proxytune.evaluation import load_evaluators, student_sampling, supervisor_samples
from proxytune.images import to_pil
from proxytune.io import read_jsonl
from proxytune.params import ProxytuneError
from proxytune.prompts import EVAL_PROMPTS, class_prompt
from proxytune.tuning import load_tuned
from testbed import world

NEXT_SCALE = {"base": "next_scale"}  # the student is `ClaimsConfig.var_preset`'s, not the params' own
FLAT = {"scale_weights": {"early": 1.0, "late": 1.0}}
# Per arm: its overlay on the `student` settings ({}: the base student untuned), None for arms that are no student.
ARMS: dict[str, dict | None] = {
    "untuned": {},
    "world": None,
    "supervisor": None,
    "proxy_tuning": {"method": "proxy_tuning", "data": "proxies"},
    "references": {"method": "proxy_tuning", "data": "references"},
    "augmented": {"method": "proxy_tuning", "data": "augmented_references"},
    "embedding_only": {"method": "two_stage", "data": "references", "two_stage": {"stage2": "none"}},
    "two_stage": {"method": "two_stage", "data": "references", "two_stage": {"stage2": "lora"}},
    "two_stage_proxies": {"method": "two_stage", "data": "proxies", "two_stage": {"stage2": "lora"}},
    "arbooth_no_prior": {"method": "arbooth", "data": "references", "arbooth": {"prior_weight": 0.0}},
    "arbooth": {"method": "arbooth", "data": "references"},
    "untuned_var": {**NEXT_SCALE},
    "arbooth_var": {**NEXT_SCALE, "method": "arbooth", "data": "references"},
    "arbooth_var_flat": {**NEXT_SCALE, "method": "arbooth", "data": "references", "arbooth": FLAT},
}
STUDENT_ARMS = tuple(a for a, s in ARMS.items() if s is not None)
METRICS = ("dino", "clip_i", "clip_t", "clip_t_scenes", "pres")
SCENE_PROMPTS = tuple(t for t in EVAL_PROMPTS if world.apply_template(world.make_subject(0), t).scene)
REFERENCE_SEED = 0  # the subject's photos stay the same across seeds: seeds vary training and sampling
VAR_PRESET = "student_var_world"


@dataclass
class ClaimsConfig:
    subjects: tuple[int, ...] = (0, 1, 2)
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = tuple(ARMS)
    images_per_prompt: int = 4  # DreamBooth's protocol
    pres_images: int = 4
    var_preset: str = VAR_PRESET  # the next-scale student's preset: a name in presets/ or a .yaml path


class NoLog:
    """The stages log to MLflow through this interface; claims runs keep their numbers in the table instead."""

    def metrics(self, values, step=None):
        pass

    def artifact(self, path, folder=None):
        pass


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
    if arm == "world":
        size, seed = int(params["prepare"]["resolution"]), int(params["seed"])
        return lambda prompts, templates: [world.render(world.apply_template(subject, t), seed * 7919 + i, size)
                                           for i, t in enumerate(templates)]
    if arm == "supervisor":
        return lambda prompts, templates: supervisor_samples(params, prompts, lora_dir)
    model = load_tuned(distilled, params["student"]) if tuned(arm) else load_student(params["student"])

    def draw(prompts, templates):
        with torch.inference_mode():
            return to_pil(model.generate(prompts, **student_sampling(params)))

    return draw


def needs_supervisor(arms) -> bool:
    """Whether any of `arms` draws with the DreamBooth supervisor or trains on its proxies: the others (the
    references-only claims) skip `supervise` and `synthesize`."""
    return any(arm == "supervisor" or "proxies" in (ARMS[arm] or {}).get("data", "") for arm in arms)


def tuned(arm: str) -> bool:
    """Whether `arm` is a student the distill stage tunes (the others draw with base weights or are no student)."""
    return "method" in (ARMS[arm] or {})


def next_scale_student(preset: str) -> dict:
    """The `student` section of the next-scale student's preset; a one-line error names a missing file."""
    student = presets.read(preset).get("student")
    if not isinstance(student, dict) or student.get("family") != "var":
        raise ProxytuneError(f"preset {preset!r}: the next-scale arms need a `student` section of family var")
    return student


def world_split(student: dict, early_scales: int) -> int:
    """`early_scales` as the schema counts them, on VAR's 10 scales at 256², for a VAR student with another
    scale count: the same number of last scales stays late (the world VAR's 6 split 4 + 2, as 8 + 2)."""
    try:
        scales = student.get("patch_nums") or pick(VAR_SIZES, student["size"], "VAR").patch_nums
    except ValueError as e:
        raise ProxytuneError(f"params: student.size: {e}") from None
    return max(0, len(scales) - (len(PATCH_NUMS_256) - early_scales))


def arm_params(params: dict, arm: str, var_preset: str = VAR_PRESET) -> dict:
    """The params an arm runs with: the base params with the arm's `student` overlay, merged over the
    next-scale student of `var_preset` for that student's arms; the schema's scale split is fitted to that
    student's scale count unless the preset sets `early_scales` itself."""
    overlay = copy.deepcopy(ARMS[arm])
    if overlay is None:
        return params
    out = copy.deepcopy(params)
    if overlay.pop("base", None) == NEXT_SCALE["base"]:
        student = next_scale_student(var_preset)
        presets.merge(out["student"], student)
        weights = out["student"]["arbooth"]["scale_weights"]
        if "early_scales" not in (student.get("arbooth") or {}).get("scale_weights", {}):  # a preset's own split
            weights["early_scales"] = world_split(out["student"], int(weights["early_scales"]))  # counts its scales
    presets.merge(out["student"], overlay)
    return out


def check_arms(params: dict, config: ClaimsConfig) -> None:
    """Fail before any stage runs when an arm is unknown or its student's preset is missing."""
    unknown = [a for a in config.arms if a not in ARMS]
    if unknown:
        raise ProxytuneError(f"arms: unknown {unknown} (known: {', '.join(ARMS)})")
    for arm in config.arms:
        arm_params(params, arm, config.var_preset)


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


# ---------------------------------------------------------------- the gate: is the supervisor the stronger model?

GATE_SEED = 1  # pretraining_specs(n, 1) is a stream no pretraining model draws from (their streams are named
# per model): the gate's renders are unseen, while its captions come from the same distribution as training's
GATE_CAPTIONS = 24


@dataclass(frozen=True)
class Check:
    """One premise of the claims: the supervisor scores above the student on `name`."""

    name: str
    supervisor: float
    student: float
    passed: bool


def _check(name: str, supervisor: float, student: float) -> Check:
    return Check(name, float(supervisor), float(student), bool(supervisor > student))


def base_gate(params: dict, config: ClaimsConfig, captions: int = GATE_CAPTIONS) -> list[Check]:
    """The base supervisor against the base (untuned) student on CLIP-T, on `captions` held-out world captions
    and on the evaluation templates with the subjects' class nouns: Proxy-Tuning's premise before any tuning."""
    if captions < 1:
        raise ProxytuneError(f"captions: must be >= 1, got {captions}")
    sets = {
        "CLIP-T, held-out world captions": [world.caption(s) for s in world.pretraining_specs(captions, GATE_SEED)],
        "CLIP-T, evaluation templates": [t.format(noun) for t in EVAL_PROMPTS for noun in
                                         dict.fromkeys(world.make_subject(i).class_noun for i in config.subjects)],
    }
    prompts = [p for ps in sets.values() for p in ps]
    student = load_student(params["student"])
    with torch.inference_mode():
        drawn = {"supervisor": supervisor_samples(params, prompts, None),
                 "student": to_pil(student.generate(prompts, **student_sampling(params)))}
    _, _, clip, _ = load_evaluators(params, [])
    checks, start = [], 0
    for name, ps in sets.items():
        scores = {m: metrics.clip_t(images[start:start + len(ps)], ps, clip) for m, images in drawn.items()}
        checks.append(_check(name, scores["supervisor"], scores["student"]))
        start += len(ps)
    return checks


def dreambooth_gate(rows: pd.DataFrame) -> list[Check]:
    """The DreamBooth-tuned supervisor against the student tuned on the references, on DINO (mean over subjects
    and seeds): whether the proxies carry more of the subject than the photos do. Empty when either did not run."""
    dino = rows.groupby("arm")["dino"].mean()
    if not {"supervisor", "references"} <= set(dino.index):
        return []
    return [_check("DINO, DreamBooth supervisor vs reference-tuned student", dino["supervisor"], dino["references"])]


def gate_markdown(checks: list[Check]) -> str:
    """The checks as a table, after a first line saying plainly whether the gate passed."""
    failed = [c for c in checks if not c.passed]
    head = ("GATE FAILED: " + "; ".join(f"{c.name}: supervisor {c.supervisor:.3f} <= student {c.student:.3f}"
                                         for c in failed)) if failed else "Gate passed."
    lines = [head, "", "| check | supervisor | student | passed |", "|---|---|---|---|"]
    lines += [f"| {c.name} | {c.supervisor:.3f} | {c.student:.3f} | {'yes' if c.passed else 'NO'} |" for c in checks]
    return "\n".join(lines)


# ---------------------------------------------------------------- verdicts

CLAIMS = {
    "a": "Proxy-Tuning: the student tuned on proxies beats tuning on the photos (plain and augmented) and its "
         "supervisor (weak-to-strong)",
    "b": "Sun et al.: two stages beat the identifier embedding alone",
    "c": "ARBooth: prior distillation lowers PRES (the class prompt's drift toward the subject); the scale-wise "
         "loss beats uniform scale weights",
    "d": "the untuned student is the floor and the world's own renders the ceiling of every arm",
}
FIDELITY = ("dino", "clip_i")
# (claim, arm claimed better, arm claimed worse, metrics); PRES is better lower.
COMPARISONS = [
    ("a", "proxy_tuning", "references", FIDELITY),
    ("a", "proxy_tuning", "augmented", FIDELITY),
    ("a", "proxy_tuning", "supervisor", (*FIDELITY, "clip_t")),
    ("a", "two_stage_proxies", "two_stage", FIDELITY),
    ("b", "two_stage", "embedding_only", FIDELITY),
    ("c", "arbooth", "arbooth_no_prior", ("pres",)),
    ("c", "arbooth_var", "arbooth_var_flat", FIDELITY),
]


@dataclass(frozen=True)
class Verdict:
    """One comparison of a claim: `better` beats `worse` on `metric` by more than `spread` (the larger of the
    two arms' seed spreads) or the claim does not reproduce."""

    claim: str
    better: str
    worse: str
    metric: str
    better_mean: float
    worse_mean: float
    spread: float
    reproduces: bool


def _floor(arm: str) -> str:
    return "untuned_var" if (ARMS[arm] or {}).get("base") == NEXT_SCALE["base"] else "untuned"


def comparisons(arms) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """The comparisons whose two arms are both in `arms`: the papers' (a)-(c), then (d) each arm against its
    student's floor and the world's ceiling on DINO."""
    arms = list(arms)
    found = [c for c in COMPARISONS if c[1] in arms and c[2] in arms]
    for arm in arms:
        if arm not in ("world", "untuned", "untuned_var") and _floor(arm) in arms:
            found.append(("d", arm, _floor(arm), ("dino",)))
    found += [("d", "world", arm, ("dino",)) for arm in arms if arm != "world" and "world" in arms]
    return found


def verdicts(rows: pd.DataFrame) -> list[Verdict]:
    """Every comparison of the arms in `rows` on the metrics they have, judged by the difference-beyond-the-spread
    rule on `table`."""
    t = table(rows)
    out = []
    for claim, better, worse, names in comparisons(t.index):
        for m in names:
            b, w = t.loc[better, ("mean", m)], t.loc[worse, ("mean", m)]
            if pd.isna(b) or pd.isna(w):  # not measured (PRES without pres_images)
                continue
            spread = max(t.loc[better, ("spread", m)], t.loc[worse, ("spread", m)])
            gain = w - b if m == "pres" else b - w
            out.append(Verdict(claim, better, worse, m, float(b), float(w), float(spread), bool(gain > spread)))
    return out


def verdicts_markdown(found: list[Verdict]) -> str:
    """Per claim a line (reproduces only when every comparison does), then each comparison."""
    lines = []
    for claim, title in CLAIMS.items():
        mine = [v for v in found if v.claim == claim]
        if mine:
            held = sum(v.reproduces for v in mine)
            word = "reproduces" if held == len(mine) else "does not reproduce"
            lines.append(f"- **({claim}) {word}** ({held} of {len(mine)} comparisons): {title}")
    lines += ["", "| claim | comparison | metric | means | spread | reproduces |", "|---|---|---|---|---|---|"]
    for v in found:
        sign = "<" if v.metric == "pres" else ">"
        lines.append(f"| ({v.claim}) | {v.better} {sign} {v.worse} | {v.metric} | {v.better_mean:.3f} vs "
                     f"{v.worse_mean:.3f} | {v.spread:.3f} | {'yes' if v.reproduces else 'no'} |")
    return "\n".join(lines)

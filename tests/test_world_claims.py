"""The miniature world's acceptance, from the shipped world-pretrained models: the premise of the claims (a base
supervisor that follows prompts better than its student, a DreamBooth supervisor that carries more of the subject
than the reference-tuned student) and every claim that reproduces in bench/claims_bench.py, judged by the same rule
(difference beyond the larger seed spread) on the same 3 subjects x 3 seeds and 4 images per prompt (at 1 image
per prompt (b)'s DINO gain sinks into the spread), at fast settings: 2 class-prompt images for PRES and only the
arms the reproducing claims compare."""
from __future__ import annotations

import pytest
from conftest import REPO

from flows import claims as claims_runner
from proxytune.params import load_params
from testbed import claims

# What reproduces in the README's table: (a) proxies beat the photos and the augmented photos for the LoRA student
# and on CLIP-I for two stages, (b) both comparisons, (c) PRES and the scale-wise loss on both metrics. (a)'s
# weak-to-strong and (d) do not, and are not asserted.
REPRODUCING = [
    ("a", "proxy_tuning", "references", "dino"),
    ("a", "proxy_tuning", "references", "clip_i"),
    ("a", "proxy_tuning", "augmented", "dino"),
    ("a", "proxy_tuning", "augmented", "clip_i"),
    ("a", "two_stage_proxies", "two_stage", "clip_i"),
    ("b", "two_stage", "embedding_only", "dino"),
    ("b", "two_stage", "embedding_only", "clip_i"),
    ("c", "arbooth", "arbooth_no_prior", "pres"),
    ("c", "arbooth_var", "arbooth_var_flat", "dino"),
    ("c", "arbooth_var", "arbooth_var_flat", "clip_i"),
]
ARMS = ("supervisor", *dict.fromkeys(arm for _, better, worse, _ in REPRODUCING for arm in (better, worse)))


@pytest.fixture(scope="module")
def world_rows(tmp_path_factory):
    work = tmp_path_factory.mktemp("claims")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PROXYTUNE_CACHE", str(work / "cache"))
        config = claims.ClaimsConfig(arms=ARMS, pres_images=2)
        rows = claims_runner.run(load_params(REPO / "params.yaml"), config, work, workers=2)
    assert len(rows) == 3 * 3 * len(ARMS)
    return rows


@pytest.mark.parametrize("comparison", REPRODUCING)
def test_the_claim_reproduces(world_rows, comparison):
    v = {(v.claim, v.better, v.worse, v.metric): v for v in claims.verdicts(world_rows)}[comparison]
    assert v.reproduces, (f"{v.better} vs {v.worse} on {v.metric}: {v.better_mean:.3f} vs {v.worse_mean:.3f}, "
                          f"spread {v.spread:.3f}")


def test_the_shipped_supervisor_beats_the_shipped_student_on_clip_t(tmp_path, monkeypatch):
    """The claims' premise, from the weights in models/world: the base supervisor follows prompts better than
    the base student, on held-out world captions and on the evaluation templates."""
    monkeypatch.setenv("PROXYTUNE_CACHE", str(tmp_path / "cache"))
    checks = claims.base_gate(load_params(REPO / "params.yaml"), claims.ClaimsConfig())
    assert [c.name for c in checks] == ["CLIP-T, held-out world captions", "CLIP-T, evaluation templates"]
    assert all(c.passed for c in checks), claims.gate_markdown(checks)


def test_the_dreambooth_supervisor_carries_more_of_the_subject_than_the_reference_tuned_student(world_rows):
    """The premise of (a), from the shipped weights: the DreamBooth supervisor (pivotal tokens + LoRA, params.yaml)
    draws more of the subject, DINO over the evaluation prompts, than the student tuned on the photos."""
    (check,) = claims.dreambooth_gate(world_rows)
    assert check.passed, claims.gate_markdown([check])

"""The miniature world's acceptance: with the shipped world-pretrained models and the project's default
settings (Sun et al.'s two stages on the subject's photos), personalisation measurably teaches the student the
subject without costing it the prompt."""
from __future__ import annotations

import pytest
from conftest import REPO

from flows import claims as claims_runner
from proxytune.params import load_params
from testbed import claims


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """One world subject, three seeds (each its own supervisor, proxies, tuning and samples)."""
    work = tmp_path_factory.mktemp("claims")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PROXYTUNE_CACHE", str(work / "cache"))
        config = claims.ClaimsConfig(subjects=(0,), seeds=(0, 1, 2), arms=("untuned", "two_stage"))
        return claims_runner.run(load_params(REPO / "params.yaml"), config, work)


@pytest.mark.parametrize("metric", ["dino", "clip_i"])
def test_personalisation_beats_the_untuned_student_by_more_than_the_seed_spread(rows, metric):
    t = claims.table(rows)
    tuned, untuned = t.loc["two_stage", ("mean", metric)], t.loc["untuned", ("mean", metric)]
    spread = max(t.loc["two_stage", ("spread", metric)], t.loc["untuned", ("spread", metric)])
    assert tuned - untuned > spread, f"{metric}: tuned {tuned:.3f} vs untuned {untuned:.3f}, spread {spread:.3f}"


def test_recontextualisation_prompts_keep_their_clip_t(rows):
    t = claims.table(rows)
    tuned, untuned = t.loc["two_stage", ("mean", "clip_t_scenes")], t.loc["untuned", ("mean", "clip_t_scenes")]
    assert tuned >= 0.9 * untuned, f"CLIP-T on scene prompts: tuned {tuned:.3f} vs untuned {untuned:.3f}"


def test_table_has_one_line_per_arm_with_mean_and_spread(rows):
    text = claims.markdown(rows)
    lines = text.splitlines()
    assert lines[0].startswith("| arm |") and len(lines) == 2 + 2
    assert all("±" in line for line in lines[2:])
    assert len(rows) == 3 * 2 and set(rows["seed"]) == {0, 1, 2}


def test_the_shipped_supervisor_beats_the_shipped_student_on_clip_t(tmp_path, monkeypatch):
    """The claims' premise, from the weights in models/world: the base supervisor follows prompts better than
    the base student, on held-out world captions and on the evaluation templates."""
    monkeypatch.setenv("PROXYTUNE_CACHE", str(tmp_path / "cache"))
    checks = claims.base_gate(load_params(REPO / "params.yaml"), claims.ClaimsConfig())
    assert [c.name for c in checks] == ["CLIP-T, held-out world captions", "CLIP-T, evaluation templates"]
    assert all(c.passed for c in checks), claims.gate_markdown(checks)

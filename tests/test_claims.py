"""The claims' arms, gate and verdicts: the rules on synthetic rows (instant), the next-scale arms and the base
gate on real models (the tiny VAR replica, the world's supervisor and LlamaGen) at a few steps."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml
from conftest import FAST, REPO, assert_one_line

from flows import claims as claims_runner
from proxytune.params import ProxytuneError, load_params
from proxytune.prompts import corpus_words
from testbed import claims
from testbed.tiny_students import build_tiny_var

VAR_ARMS = ("untuned_var", "arbooth_var", "arbooth_var_flat")


def rows_of(means: dict[str, dict[str, list[float]]]) -> pd.DataFrame:
    """Rows of one subject: per arm and metric, one value per seed (the per-seed means themselves)."""
    rows = []
    for arm, by_metric in means.items():
        seeds = len(next(iter(by_metric.values())))
        for seed in range(seeds):
            rows.append({"subject": 0, "seed": seed, "arm": arm,
                         **{m: by_metric.get(m, [math.nan] * seeds)[seed] for m in claims.METRICS}})
    return pd.DataFrame(rows)


def verdict(found, better, worse, metric):
    [v] = [v for v in found if (v.better, v.worse, v.metric) == (better, worse, metric)]
    return v


# ---------------------------------------------------------------- verdicts on synthetic rows

def test_a_claim_reproduces_only_when_its_difference_exceeds_the_larger_spread():
    rows = rows_of({
        "two_stage": {"dino": [0.50, 0.52, 0.48], "clip_i": [0.30, 0.40, 0.20]},   # spread 0.016 / 0.082
        "embedding_only": {"dino": [0.30, 0.31, 0.29], "clip_i": [0.25, 0.25, 0.25]},
    })
    found = claims.verdicts(rows)
    dino, clip_i = verdict(found, "two_stage", "embedding_only", "dino"), verdict(found, "two_stage",
                                                                                 "embedding_only", "clip_i")
    assert dino.reproduces and dino.better_mean == pytest.approx(0.50) and dino.worse_mean == pytest.approx(0.30)
    assert dino.spread == pytest.approx(claims.table(rows).loc["two_stage", ("spread", "dino")])
    assert not clip_i.reproduces  # 0.05 above, but the seeds spread 0.08
    assert "**(b) does not reproduce** (1 of 2 comparisons)" in claims.verdicts_markdown(found)


def test_a_worse_arm_never_reproduces_the_claim():
    rows = rows_of({"proxy_tuning": {"dino": [0.1, 0.1]}, "references": {"dino": [0.3, 0.3]}})
    assert not verdict(claims.verdicts(rows), "proxy_tuning", "references", "dino").reproduces


def test_pres_reproduces_when_prior_distillation_lowers_it():
    lower = rows_of({"arbooth": {"pres": [0.10, 0.12]}, "arbooth_no_prior": {"pres": [0.40, 0.42]}})
    higher = rows_of({"arbooth": {"pres": [0.40, 0.42]}, "arbooth_no_prior": {"pres": [0.10, 0.12]}})
    assert verdict(claims.verdicts(lower), "arbooth", "arbooth_no_prior", "pres").reproduces
    assert not verdict(claims.verdicts(higher), "arbooth", "arbooth_no_prior", "pres").reproduces
    assert "| arbooth < arbooth_no_prior | pres |" in claims.verdicts_markdown(claims.verdicts(lower))


def test_claims_whose_arms_did_not_run_are_skipped():
    rows = rows_of({"two_stage": {"dino": [0.5]}, "embedding_only": {"dino": [0.3]}})
    found = claims.verdicts(rows)
    assert {v.claim for v in found} == {"b"}
    text = claims.verdicts_markdown(found)
    assert "(b) reproduces" in text and "(a)" not in text and "(c)" not in text


def test_floor_and_ceiling_compare_each_arm_with_its_own_students_floor():
    dino = {"untuned": [0.1], "untuned_var": [0.2], "world": [0.9], "two_stage": [0.3], "arbooth_var": [0.15],
            "supervisor": [0.4]}
    found = claims.verdicts(rows_of({arm: {"dino": v} for arm, v in dino.items()}))
    floors = {(v.better, v.worse) for v in found if v.claim == "d" and v.better != "world"}
    assert floors == {("two_stage", "untuned"), ("supervisor", "untuned"), ("arbooth_var", "untuned_var")}
    ceilings = {v.worse for v in found if v.claim == "d" and v.better == "world"}
    assert ceilings == set(dino) - {"world"}
    assert not verdict(found, "arbooth_var", "untuned_var", "dino").reproduces  # below its own floor
    assert verdict(found, "world", "untuned", "dino").reproduces


# ---------------------------------------------------------------- the gate's logic and rendering

def test_dreambooth_gate_compares_the_tuned_supervisor_with_the_reference_tuned_student():
    rows = pd.concat([rows_of({"supervisor": {"dino": [0.2, 0.4]}, "references": {"dino": [0.5, 0.5]}}),
                      rows_of({"supervisor": {"dino": [0.6, 0.6]}, "references": {"dino": [0.1, 0.1]}})
                      .assign(subject=1)])
    [check] = claims.dreambooth_gate(rows)
    assert (check.supervisor, check.student, check.passed) == (pytest.approx(0.45), pytest.approx(0.3), True)
    assert claims.dreambooth_gate(rows[rows.arm != "references"]) == []


def test_a_failed_gate_is_said_plainly_first():
    checks = [claims.Check("CLIP-T, captions", 0.2, 0.5, False), claims.Check("CLIP-T, templates", 0.6, 0.5, True)]
    text = claims.gate_markdown(checks)
    assert text.splitlines()[0] == "GATE FAILED: CLIP-T, captions: supervisor 0.200 <= student 0.500"
    assert "| CLIP-T, templates | 0.600 | 0.500 | yes |" in text
    assert claims.gate_markdown(checks[1:]).startswith("Gate passed.")


# ---------------------------------------------------------------- arms: the papers' data, the next-scale student

@pytest.fixture(scope="module")
def world_params():
    """The project's params (world models) at a few steps, as the claims runner gets them."""
    params = load_params(REPO / "params.yaml")
    for section, values in FAST.items():
        if section != "student":
            params[section].update(values)
    params["student"].update(steps=2, batch_size=2, augment_copies=1)
    params["student"]["two_stage"]["embedding_steps"] = 2
    params["student"]["arbooth"]["prior_images"] = 2
    return params


@pytest.fixture(scope="module")
def var_preset(tmp_path_factory) -> str:
    """presets/student_var_tiny.yaml with its paths pointing at a freshly built tiny VAR."""
    root = tmp_path_factory.mktemp("var")
    built = build_tiny_var(root / "var", corpus_words(), seed=0, image_size=64)
    preset = yaml.safe_load((REPO / "presets" / "student_var_tiny.yaml").read_text())
    preset["student"].update({k: str(built[k]) for k in ("checkpoint", "vq_checkpoint", "tokenizer")})
    (root / "student_var_tiny.yaml").write_text(yaml.safe_dump(preset))
    return str(root / "student_var_tiny.yaml")


def test_arms_train_on_the_data_their_papers_used(world_params):
    data = {arm: claims.arm_params(world_params, arm)["student"]["data"] for arm in claims.ARMS
            if claims.tuned(arm) and arm not in VAR_ARMS}
    assert data == {"proxy_tuning": "proxies", "references": "references", "augmented": "augmented_references",
                    "embedding_only": "references", "two_stage": "references", "two_stage_proxies": "proxies",
                    "arbooth_no_prior": "references", "arbooth": "references"}
    assert claims.arm_params(world_params, "arbooth")["student"]["arbooth"]["prior_weight"] > 0
    assert claims.arm_params(world_params, "untuned") == world_params
    assert not claims.tuned("untuned") and not claims.tuned("untuned_var") and claims.tuned("arbooth_var")


def test_next_scale_arms_take_the_presets_student_and_split_its_scales(world_params, var_preset):
    weights = world_params["student"]["arbooth"]["scale_weights"]
    scaled = claims.arm_params(world_params, "arbooth_var", var_preset)["student"]
    flat = claims.arm_params(world_params, "arbooth_var_flat", var_preset)["student"]
    untuned = claims.arm_params(world_params, "untuned_var", var_preset)["student"]
    assert scaled["family"] == flat["family"] == untuned["family"] == "var"
    assert scaled["checkpoint"] == var_preset.replace("student_var_tiny.yaml", "var/var_tiny.pth")
    assert (scaled["method"], scaled["data"], "base" in scaled) == ("arbooth", "references", False)
    # the tiny VAR's 4 scales keep the schema's last 2 of VAR's 10 late
    assert scaled["arbooth"]["scale_weights"] == {**weights, "early_scales": 2}
    assert (flat["arbooth"]["scale_weights"]["early"], flat["arbooth"]["scale_weights"]["late"]) == (1.0, 1.0)
    assert scaled["arbooth"]["prior_weight"] == world_params["student"]["arbooth"]["prior_weight"]


def test_a_presets_own_scale_split_is_kept_and_the_flat_arm_differs():
    """The world VAR's preset says `early_scales: 4` in its own 6 scales: fitting it again would make it 0, every
    scale `late`, and the scale-wise arm the flat one."""
    params = load_params(REPO / "params.yaml")
    scaled = claims.arm_params(params, "arbooth_var")["student"]["arbooth"]["scale_weights"]
    flat = claims.arm_params(params, "arbooth_var_flat")["student"]["arbooth"]["scale_weights"]
    assert (scaled["early_scales"], scaled["early"], scaled["late"]) == (4, 1.0, 0.5)
    assert (flat["early"], flat["late"]) == (1.0, 1.0)


def test_the_world_vars_six_scales_split_four_and_two():
    assert claims.world_split({"family": "var", "size": "tiny", "patch_nums": [1, 2, 3, 4, 6, 8]}, 8) == 4
    assert claims.world_split({"family": "var", "size": "d16"}, 8) == 8


def test_a_missing_next_scale_preset_or_bad_arm_or_workers_fails_in_one_line(world_params, tmp_path):
    config = claims.ClaimsConfig(arms=("untuned", "arbooth_var"), var_preset="student_var_nowhere")
    with pytest.raises(ProxytuneError) as err:
        claims.check_arms(world_params, config)
    assert_one_line(err, "student_var_nowhere.yaml")
    with pytest.raises(ProxytuneError) as err:
        claims.check_arms(world_params, claims.ClaimsConfig(arms=("untuned", "arbooth_v")))
    assert_one_line(err, "arms", "arbooth_v")
    with pytest.raises(ProxytuneError) as err:
        claims_runner.run(world_params, claims.ClaimsConfig(arms=("untuned",)), tmp_path / "work", workers=0)
    assert_one_line(err, "workers")


def test_next_scale_arms_run_and_score_like_the_others(world_params, var_preset, tmp_path, monkeypatch):
    monkeypatch.setenv("PROXYTUNE_CACHE", str(tmp_path / "cache"))
    config = claims.ClaimsConfig(subjects=(0,), seeds=(0, 1), arms=("supervisor", "references", *VAR_ARMS),
                                 images_per_prompt=1, pres_images=1, var_preset=var_preset)
    rows = claims_runner.run(world_params, config, tmp_path / "work", workers=2)  # one process per seed
    assert list(rows["arm"]) == list(config.arms) * 2 and list(rows["seed"]) == [0] * 5 + [1] * 5
    rows = rows[rows["seed"] == 0]
    assert rows.set_index("arm").loc[list(VAR_ARMS), ["dino", "clip_i", "clip_t", "pres"]].notna().all().all()
    scaled, flat = (rows.set_index("arm").loc[a, "dino"] for a in ("arbooth_var", "arbooth_var_flat"))
    assert scaled != flat  # the weights changed what was learnt
    assert (tmp_path / "work" / "subject0-seed0" / "grid.png").is_file()
    assert {v.worse for v in claims.verdicts(rows) if v.better == "arbooth_var"} == {"arbooth_var_flat",
                                                                                    "untuned_var"}
    assert len(claims.dreambooth_gate(rows)) == 1


def test_base_gate_scores_both_base_models_on_both_prompt_sets(world_params, tmp_path, monkeypatch):
    monkeypatch.setenv("PROXYTUNE_CACHE", str(tmp_path / "cache"))
    checks = claims.base_gate(world_params, claims.ClaimsConfig(subjects=(0,)), captions=2)
    assert [c.name for c in checks] == ["CLIP-T, held-out world captions", "CLIP-T, evaluation templates"]
    for c in checks:
        assert -1 <= c.supervisor <= 1 and -1 <= c.student <= 1 and c.supervisor != c.student
        assert c.passed == (c.supervisor > c.student)
    with pytest.raises(ProxytuneError) as err:
        claims.base_gate(world_params, claims.ClaimsConfig(), captions=0)
    assert_one_line(err, "captions")


def test_bench_prints_the_base_gate_first_and_the_dreambooth_gate_and_verdicts_after_the_table(
        tmp_path, monkeypatch, capsys):
    from bench import claims_bench

    rows = rows_of({"supervisor": {"dino": [0.2, 0.3]}, "references": {"dino": [0.4, 0.5]},
                    "two_stage": {"dino": [0.6, 0.6], "clip_i": [0.3, 0.3]},
                    "embedding_only": {"dino": [0.3, 0.3], "clip_i": [0.2, 0.2]}})
    failed = [claims.Check("CLIP-T, held-out world captions", 0.1, 0.5, False)]
    monkeypatch.setattr(claims_bench, "RESULTS", tmp_path)
    monkeypatch.setenv("PROXYTUNE_CACHE", str(tmp_path / "cache"))  # main() only sets it where unset
    monkeypatch.setattr(claims, "base_gate", lambda params, config: failed)
    monkeypatch.setattr(claims_bench.claims_runner, "run", lambda params, config, work, workers: rows)
    text = claims_bench.main(["--subjects", "0", "--seeds", "0", "1", "--arms", "supervisor", "references",
                              "two_stage", "embedding_only"])
    order = [text.index(s) for s in ("GATE FAILED: CLIP-T, held-out world captions", "| arm |",
                                     "GATE FAILED: DINO, DreamBooth supervisor", "**(b) reproduces**")]
    assert order == sorted(order)
    assert (tmp_path / "claims.md").read_text() == text and (tmp_path / "claims.csv").is_file()
    assert capsys.readouterr().out.startswith("## Gate: base models\n\nGATE FAILED")

"""Presets: every key they set exists in params.yaml, applying one keeps params.yaml's comments, and the
student presets run the distill stage on the other families' tiny replicas."""
from __future__ import annotations

import json

import pytest
import yaml
from conftest import REPO, assert_one_line, in_folder, paths

from orchestration import presets
from proxytune.params import ProxytuneError, load_params
from proxytune.tuning import load_tuned
from tasks import distill, evaluate

PRESET_FILES = sorted((REPO / "presets").glob("*.yaml"))


def leaf_keys(tree: dict, where: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        out += leaf_keys(value, f"{where}{key}.") if isinstance(value, dict) else [f"{where}{key}"]
    return out


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.stem)
def test_every_preset_key_exists_in_params(path):
    defaults = set(leaf_keys(yaml.safe_load((REPO / "params.yaml").read_text())))
    keys = leaf_keys(yaml.safe_load(path.read_text()))
    family_only = {"student.vq_config", "student.tokenizer"}  # read by one family's from_params, absent from the default's section
    assert keys and not [k for k in keys if k not in defaults | family_only]


def test_apply_merges_and_keeps_comments(tmp_path, capsys):
    params_file = tmp_path / "params.yaml"
    params_file.write_text((REPO / "params.yaml").read_text())  # the project's file, comments and all
    before = params_file.read_text()
    assert presets.main(["apply", "two_stage_lumina_mgpt_7b", "--params", str(params_file)]) == 0
    after = params_file.read_text()
    params = load_params(params_file)
    assert params["student"]["method"] == "two_stage" and params["student"]["two_stage"]["embedding_steps"] == 1500
    assert params["student"]["lora_rank"] == yaml.safe_load(before)["student"]["lora_rank"]  # untouched keys stay
    comments = [line.split("#", 1)[1] for line in before.splitlines() if line.lstrip().startswith("#")]
    assert comments and all(c in after for c in comments)
    assert "student.two_stage.embedding_steps" in capsys.readouterr().out

    assert presets.main(["apply", "no_such_preset", "--params", str(params_file)]) == 2
    with pytest.raises(ProxytuneError) as err:
        presets.apply(["no_such_preset"], params_file)
    assert_one_line(err, "no_such_preset", "two_stage_lumina_mgpt_7b")


@pytest.mark.parametrize("family", ["lumina_mgpt", "janus_pro", "var", "infinity"])
def test_student_presets_run_distill_and_evaluate(synthesized, log, family):
    presets.apply([f"student_{family}_tiny"], synthesized / "params.yaml")
    # the preset names the replicas as bootstrap lays them out (models/tiny/...): this test folder's copy
    params = in_folder(load_params(synthesized / "params.yaml"), synthesized)
    params["student"]["steps"] = 2
    distill.run(params, log, paths(synthesized, "distill"))
    card = json.loads((synthesized / "outputs/distill/card.json").read_text())
    assert card["family"] == family and card["files"] == ["adapter"]
    images = load_tuned(synthesized / "outputs/distill", params["student"]).generate(["a sks toy in the snow"], seed=3)
    assert images.shape == (1, 3, 64, 64) and images.min() >= -1 and images.max() <= 1

    evaluate.run(params, log, paths(synthesized, "evaluate"))
    scores = json.loads((synthesized / "outputs/metrics.json").read_text())
    assert {"student", "supervisor"} <= set(scores) and -1 <= scores["student"]["clip_t"] <= 1

"""`proxytune.params`: every bad value stops with one line naming the file or the parameter."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import assert_one_line

from proxytune import schema
from proxytune.params import ProxytuneError, get, load_params, local_path, model_source
from proxytune.params import main as params_cli

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


# ---------------------------------------------------------------- load_params


def test_load_params_reads_the_default(tmp_path, repo_params):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(repo_params))
    params = load_params(path)
    assert params == repo_params
    assert params["subject"]["name"] == "demo_toy"


def test_load_params_defaults_to_cwd(repo_params):
    assert Path.cwd() == REPO  # the tests run in the project
    assert load_params() == repo_params


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "params.yaml"
    with pytest.raises(ProxytuneError) as err:
        load_params(path)
    assert_one_line(err, str(path))


def test_missing_default_file_in_cwd(tmp_path):
    """Run where there is no params.yaml (a child process: the tests never leave the project)."""
    code = ("from proxytune.params import ProxytuneError, load_params\n"
            "try:\n    load_params()\nexcept ProxytuneError as e:\n    print(e)\nelse:\n    print('loaded')")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO)})
    msg = out.stdout.rstrip("\n")
    assert msg and "\n" not in msg, f"error message must be one line: {msg!r}"
    assert msg != "loaded" and "params.yaml" in msg


def test_a_folder_is_not_a_params_file(tmp_path):
    with pytest.raises(ProxytuneError) as err:
        load_params(tmp_path)
    assert_one_line(err, str(tmp_path))


@pytest.mark.parametrize("text", [
    "subject: {name: demo\n",                 # unclosed flow mapping
    "subject:\n  name: a\n name: b\n",        # bad indentation
    "seed: [1, 2\nsubject:\n\tname: x\n",     # tabs + unclosed list: multi-line YAML error
    "a: b: c\n",
])
def test_invalid_yaml(tmp_path, text):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ProxytuneError) as err:
        load_params(path)
    assert_one_line(err, str(path))


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("subject:\n  name: demo\n  class_noun: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ProxytuneError) as err:
        load_params(path)
    assert_one_line(err, str(path))


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n", ""])
def test_non_mapping(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ProxytuneError) as err:
        load_params(path)
    assert_one_line(err, str(path))


def test_missing_subject_name_names_parameter(tmp_path, repo_params):
    del repo_params["subject"]["name"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(repo_params))
    with pytest.raises(ProxytuneError) as err:
        load_params(path)
    assert_one_line(err, "subject.name")


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x" * 65, "has space", "-lead"])
def test_unsafe_subject_name(tmp_path, repo_params, name):
    repo_params["subject"]["name"] = name
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(repo_params))
    with pytest.raises(ProxytuneError) as err:
        load_params(path)
    assert_one_line(err, "subject.name")


@pytest.mark.parametrize("name", ["demo_toy", "Dog-2", "x" * 64, "7"])
def test_safe_subject_name(tmp_path, repo_params, name):
    repo_params["subject"]["name"] = name
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(repo_params))
    assert str(load_params(path)["subject"]["name"]) == name


# ---------------------------------------------------------------- get / local_path / model_source / choice

P = {"a": {"b": {"c": 3}, "s": "text"}, "top": None}


def test_get_found():
    assert get(P, "a.b.c") == 3
    assert get(P, "a.b") == {"c": 3}
    assert get(P, "top") is None


@pytest.mark.parametrize("dotted", ["a.b.x", "nope", "a.s.deeper", "a.b.c.d"])
def test_get_missing_names_dotted_parameter(dotted):
    with pytest.raises(ProxytuneError) as err:
        get(P, dotted)
    assert_one_line(err, dotted)


def test_local_path(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "w.pt").write_bytes(b"x")
    params = {"m": {"weights": str(tmp_path / "models/w.pt"), "folder": str(tmp_path / "models"),
                    "gone": str(tmp_path / "models/gone.pt")}}
    assert local_path(params, "m.weights") == tmp_path / "models/w.pt"
    assert local_path(params, "m.folder", "folder") == tmp_path / "models"
    with pytest.raises(ProxytuneError) as err:
        local_path(params, "m.gone", "weights file")
    assert_one_line(err, "m.gone", str(tmp_path / "models/gone.pt"))
    with pytest.raises(ProxytuneError) as err:
        local_path(params, "m.absent")
    assert_one_line(err, "m.absent")


def test_model_source(tmp_path):
    (tmp_path / "models" / "sd").mkdir(parents=True)
    params = {"supervisor": {
        "local": "models/world/supervisor",  # relative to the project (cwd), as params.yaml names it
        "absolute": str(tmp_path / "models" / "sd"),
        "hub": "runwayml/stable-diffusion-v1-5",
        "hub2": "org/name",
        "missing_local": "models/not-there",
        "missing_data": "outputs/x",
        "garbage": "not a model",
        "three": "a/b/c",
    }}
    assert model_source(params, "supervisor.local") == "models/world/supervisor"
    assert model_source(params, "supervisor.absolute") == str(tmp_path / "models" / "sd")
    assert model_source(params, "supervisor.hub") == "runwayml/stable-diffusion-v1-5"
    assert model_source(params, "supervisor.hub2") == "org/name"
    for key, value in [("missing_local", "models/not-there"), ("missing_data", "outputs/x"),
                       ("garbage", "not a model"), ("three", "a/b/c")]:
        with pytest.raises(ProxytuneError) as err:
            model_source(params, f"supervisor.{key}")
        assert_one_line(err, f"supervisor.{key}", value)


# ---------------------------------------------------------------- the schema


def test_defaults_fill_a_minimal_file(tmp_path, repo_params):
    """The schema's defaults are params.yaml's values: a file naming only the subject loads as params.yaml."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"subject": repo_params["subject"]}))
    assert load_params(path) == repo_params


def test_library_defaults_are_the_schema_defaults(repo_params):
    from dataclasses import fields

    from proxytune.dreambooth import DreamBoothConfig
    from proxytune.tuning import TuneConfig

    tune = TuneConfig()
    student = repo_params["student"]
    for f in fields(TuneConfig):
        if f.name in student:
            assert getattr(tune, f.name) == student[f.name], f.name
    assert (tune.embedding_steps, tune.stage2) == (student["two_stage"]["embedding_steps"], "lora")
    dreambooth = DreamBoothConfig(model="m", instance_images=[], instance_prompt="p", class_prompt="c")
    for f in fields(DreamBoothConfig):
        if f.name in repo_params["supervisor"] and f.name != "model":
            assert getattr(dreambooth, f.name) == repo_params["supervisor"][f.name], f.name


def test_choices_match_what_the_code_knows():
    """The schema's choices are the names the library and ar_models dispatch on."""
    from typing import get_args

    from ar_models import FAMILIES
    from proxytune.diffusion import SCHEDULERS
    from proxytune.dreambooth import DTYPES
    from proxytune.tuning import RECIPES

    def choices(model, key):
        return set(get_args(model.model_fields[key].annotation))

    assert choices(schema.Student, "family") == set(FAMILIES)
    assert choices(schema.Student, "method") == set(RECIPES)
    assert choices(schema.Supervisor, "mixed_precision") == set(DTYPES)
    assert set(get_args(schema.Scheduler)) == set(SCHEDULERS)


def test_unknown_keys_are_errors_except_family_specific_student_keys(tmp_path, repo_params):
    path = tmp_path / "params.yaml"
    repo_params["student"]["vq_config"] = "models/x/vqgan.yaml"  # a family's own key passes through
    repo_params["supervisor"]["step"] = 5  # a typo of steps
    path.write_text(yaml.safe_dump(repo_params))
    with pytest.raises(ProxytuneError) as err:
        load_params(path)
    assert_one_line(err, "supervisor.step", "unknown parameter")
    del repo_params["supervisor"]["step"]
    path.write_text(yaml.safe_dump(repo_params))
    assert load_params(path)["student"]["vq_config"] == "models/x/vqgan.yaml"


@pytest.mark.parametrize("text, value", [("5e-3", 5e-3), ("1.0e-3", 1e-3), ("'2E-4'", 2e-4), ("3", 3.0)])
def test_numbers_as_dvc_exp_run_set_writes_them(tmp_path, repo_params, text, value):
    """`dvc exp run -S student.learning_rate=5e-3` leaves `5e-3` in params.yaml, which PyYAML reads as text."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(repo_params).replace("learning_rate: 0.001", f"learning_rate: {text}"))
    params = load_params(path)
    assert params["student"]["learning_rate"] == value and isinstance(params["student"]["learning_rate"], float)


def test_several_violations_are_still_one_line(tmp_path, repo_params):
    repo_params["supervisor"].update(steps=0, batch_size=0)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(repo_params))
    with pytest.raises(ProxytuneError) as err:
        load_params(path)
    assert_one_line(err, "params: supervisor.steps = 0: must be >= 1", "1 more", "proxytune params --check")


@pytest.mark.parametrize("section, values, key, rule", [
    ("supervisor", {"prior_preservation": True, "num_class_images": 0}, "supervisor.num_class_images",
     "prior_preservation"),
    ("student", {"method": "arbooth", "arbooth": {"prior_weight": 0.5, "prior_images": 0}},
     "student.arbooth.prior_images", "prior_weight"),
])
def test_cross_field_rules_name_the_key(tmp_path, repo_params, section, values, key, rule):
    repo_params[section].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(repo_params))
    with pytest.raises(ProxytuneError) as err:
        load_params(path)
    assert_one_line(err, f"{key} = 0", rule)


def test_params_command_documents_every_parameter(capsys, repo_params):
    assert params_cli([]) == 0
    out = capsys.readouterr().out
    for key in ("seed", "supervisor.steps", "student.two_stage.stage2", "student.arbooth.scale_weights.late"):
        assert f"  {key} " in out
    assert "whole number, >= 1; default 80. optimizer steps" in out  # type, rule, default, description
    documented = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}

    def leaves(tree, where=""):
        for k, v in tree.items():
            yield from leaves(v, f"{where}{k}.") if isinstance(v, dict) else [f"{where}{k}"]

    assert set(leaves(repo_params)) <= documented


def test_params_check_lists_every_violation(tmp_path, repo_params, capsys):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(repo_params))
    assert params_cli(["--check", str(path)]) == 0
    assert "ok" in capsys.readouterr().out
    repo_params["student"].update(steps="thirty", batch_size=0)
    path.write_text(yaml.safe_dump(repo_params))
    assert params_cli(["--check", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {path}: params: student.steps = 'thirty': must be a whole number",
                   f"error: {path}: params: student.batch_size = 0: must be >= 1"]
    assert params_cli(["--check", str(tmp_path / "none.yaml")]) == 2
    assert "params file not found" in capsys.readouterr().err


# ---------------------------------------------------------------- ar_models.load_student


def test_load_student_errors_name_the_parameter(project):
    from ar_models import ModelConfigError, load_student

    student = load_params(project / "params.yaml")["student"]
    assert load_student(copy.deepcopy(student)) is not None  # the default loads

    bad = copy.deepcopy(student)
    bad["family"] = "nosuchfamily"
    with pytest.raises(ModelConfigError) as err:
        load_student(bad)
    assert_one_line(err, "student.family", "nosuchfamily")

    bad = copy.deepcopy(student)
    bad["checkpoint"] = str(project / "models/tiny/llamagen/missing.pt")
    with pytest.raises(ModelConfigError) as err:
        load_student(bad)
    assert_one_line(err, "student.checkpoint", "missing.pt")

    bad = copy.deepcopy(student)
    bad["checkpoint"] = str(project / "models/tiny/llamagen")  # a folder, not a weights file
    with pytest.raises(ModelConfigError) as err:
        load_student(bad)
    assert_one_line(err, "student.checkpoint")

    bad = copy.deepcopy(student)
    bad["vq_checkpoint"] = str(project / "models/tiny/llamagen/missing_vq.pt")
    with pytest.raises(ModelConfigError) as err:
        load_student(bad)
    assert_one_line(err, "student.vq_checkpoint")

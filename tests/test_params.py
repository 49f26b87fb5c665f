"""`proxytune.params`: every bad value stops with one line naming the file or the parameter."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import assert_one_line

from proxytune.params import ProxytuneError, choice, get, load_params, local_path, model_source

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


def test_choice():
    params = {"student": {"size": "B", "vq": "nope"}}
    assert choice(params, "student.size", {"tiny", "B", "L"}) == "B"
    with pytest.raises(ProxytuneError) as err:
        choice(params, "student.vq", {"tiny", "VQ-16"})
    msg = assert_one_line(err, "student.vq", "nope")
    assert "VQ-16" in msg and "tiny" in msg  # lists what is allowed
    with pytest.raises(ProxytuneError) as err:
        choice(params, "student.missing", {"a"})
    assert_one_line(err, "student.missing")


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

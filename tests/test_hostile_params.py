"""Hostile values in params.yaml: each stops `python -m flows.pipeline` before any stage runs, with one line
naming the dotted key, its value and the rule, and leaves the outputs already there byte for byte."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_params

from flows import pipeline
from proxytune import schema
from proxytune.params import load_params

# (dotted key, value) pairs a user might write; None is YAML's null
NAMED = [
    ("supervisor.steps", -5), ("supervisor.steps", 0), ("supervisor.learning_rate", -1.0),
    ("student.batch_size", 0), ("supervisor.num_class_images", -3), ("supervisor.lora_rank", -4),
    ("subject.class_noun", ""), ("subject.class_noun", None), ("subject.class_noun", "toy "),
    ("subject.class_noun", "{} toy"), ("subject.identifier", "my sks"), ("subject.identifier", ""),
    ("student.steps", "thirty"), ("student.learning_rate", "thirty"), ("student.lora_rank", "thirty"),
    ("student.batch_size", 2.5), ("supervisor.prior_preservation", "yes"), ("student.method", "dreambooth"),
    ("student.two_stage.stage2", "all"), ("supervisor.weighting_scheme", "uniformish"),
    ("evaluate.prompts", []), ("evaluate.prompts", ["a {0} without its class"]),
    ("student.arbooth.betas", [0.9]), ("seed", -1), ("subject.caption", "a photo of sks toy"),
    ("subject.caption", "{} and {}"),
]


def leaves(model: type = schema.Params, where: str = ""):
    """(dotted key, field) of every numeric parameter."""
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, schema.BaseModel):
            yield from leaves(info.annotation, f"{where}{name}.")
        else:
            yield f"{where}{name}", info


def numeric_cases():
    """Every numeric param at 0, negative and as text, wherever the schema says that is invalid."""
    cases = []
    for key, info in leaves():
        kind = schema.type_rule(info.annotation, info.metadata)
        if not kind.startswith(("whole number", "number")):
            continue
        cases.append((key, "thirty"))
        for value in (0, -1):
            try:
                schema.validate(with_value(base(), key, value))
            except schema.ValidationError:
                cases.append((key, value))
    return cases


def base() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def with_value(params: dict, key: str, value) -> dict:
    *sections, leaf = key.split(".")
    node = params
    for section in sections:
        node = node[section]
    node[leaf] = value
    return params


def tree_hashes(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


CASES = NAMED + [c for c in numeric_cases() if c not in NAMED]


def test_the_cases_cover_the_issue_and_every_numeric_param():
    numeric = {key for key, info in leaves() if schema.type_rule(info.annotation, info.metadata)
               .startswith(("whole number", "number"))}
    assert numeric <= {key for key, value in CASES if value == "thirty"}
    assert len(numeric) > 40 and ("supervisor.steps", 0) in CASES and ("evaluate.top_k", 0) not in CASES


@pytest.fixture(scope="module")
def finished(staged, tmp_path_factory) -> Path:
    """A project folder whose outputs hold prepare, supervise and synthesize results (copied once: no case
    may change them)."""
    root = tmp_path_factory.mktemp("hostile")
    write_params(root)
    shutil.copytree(staged / "outputs", root / "outputs")
    return root


@pytest.mark.parametrize("key, value", CASES, ids=[f"{k}={v!r}" for k, v in CASES])
def test_hostile_value_is_one_line_and_leaves_outputs_alone(finished, tmp_path, capsys, monkeypatch, key, value):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{finished / 'mlflow.db'}")
    monkeypatch.setenv("PROXYTUNE_CACHE", str(finished / ".proxytune" / "cache"))
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(with_value(yaml.safe_load((finished / "params.yaml").read_text()),
                                                     key, value)))
    before = tree_hashes(finished / "outputs")
    assert len(before) > 10

    code = pipeline.main(["--params", str(params_file), "--stage", "supervise", "--under", str(finished)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: params: {key} = {value!r}: "), err
    assert tree_hashes(finished / "outputs") == before


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "presets").glob("*.yaml")))
def test_every_preset_applied_to_params_yaml_validates(tmp_path, preset):
    from orchestration import presets

    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    presets.apply([preset], path)
    overlay = yaml.safe_load((REPO / "presets" / f"{preset}.yaml").read_text())
    params = load_params(path)

    def holds(tree: dict, part: dict) -> bool:
        return all(holds(tree[k], v) if isinstance(v, dict) else tree[k] == v for k, v in part.items())

    assert holds(params, overlay)

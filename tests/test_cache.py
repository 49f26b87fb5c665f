"""`orchestration.cache` keys and stamps, and `proxytune.io.atomic_dir`."""
from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import FAST, REPO, assert_one_line, paths, write_params

from orchestration import cache
from orchestration.cache import outputs_current, stage_key, write_stamp
from proxytune import io
from proxytune.io import atomic_dir, cache_dir
from proxytune.params import ProxytuneError, load_params
from testbed.demo import write_demo_subject

STAGES = ["bootstrap", "prepare", "supervise", "synthesize", "distill", "evaluate"]

# Stand-ins for the files `bootstrap` builds: keys only hash contents, so small fake weights do
# (and spare this file the real bootstrap, which takes ~20 s on 2 CPU cores).
FAKE_MODELS = {
    "models/tiny/supervisor/model_index.json": b'{"_class_name": "StableDiffusionPipeline"}',
    "models/tiny/supervisor/unet/diffusion_pytorch_model.safetensors": bytes(range(256)) * 64,
    "models/tiny/llamagen/t2i.pt": bytes(range(255, -1, -1)) * 64,
    "models/tiny/llamagen/vq.pt": b"vq" * 4096,
    "models/tiny/llamagen/text_encoder/config.json": b'{"d_model": 8}',
    "models/tiny/evaluators/dino/config.json": b'{"hidden_size": 8}',
    "models/tiny/evaluators/clip/open_clip_model.safetensors": b"clip" * 2048,
    "models/tiny/evaluators/clip/proxytune-tiny-clip.json": b'{"embed_dim": 8}',
}
# The params name those files (as the tiny default did), so their contents are part of the keys.
TINY_MODELS = {
    "supervisor": {"model": "models/tiny/supervisor"},
    "student": {"checkpoint": "models/tiny/llamagen/t2i.pt", "vq_checkpoint": "models/tiny/llamagen/vq.pt",
                "text_encoder": "models/tiny/llamagen/text_encoder"},
    "evaluate": {"dino": "models/tiny/evaluators/dino",
                 "clip_pretrained": "models/tiny/evaluators/clip/open_clip_model.safetensors",
                 "clip_config_dir": "models/tiny/evaluators/clip"},
}


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A test folder with params.yaml, the demo subject and stand-in model files (the code stays in REPO)."""
    root = tmp_path / "proj"
    write_params(root, {section: {**FAST.get(section, {}), **values} for section, values in TINY_MODELS.items()})
    write_demo_subject(root / "data" / "demo_subject")
    for rel, data in FAKE_MODELS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    monkeypatch.setenv("PROXYTUNE_CACHE", str(root / ".proxytune" / "cache"))
    return root


def keys(params: dict, root: Path) -> dict[str, str]:
    """Every stage's key, each with its paths laid out below `root`."""
    return {s: stage_key(s, params, paths(root, s)) for s in STAGES}


def code_copy(root: Path, dep: str) -> Path:
    """dvc.yaml and the code file `dep`, copied as plain data so a test may edit them: the code deps are hashed
    in the project (stage_key's `project`), and the real worktree must never change under a running suite."""
    root.mkdir(parents=True)
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / dep).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / dep, root / dep)
    return root


def bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, (st.st_atime + 1000, st.st_mtime + 1000))


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- stage_key


def test_keys_are_stable_and_distinct(project):
    params = load_params(project / "params.yaml")
    first = keys(params, project)
    assert keys(load_params(project / "params.yaml"), project) == first
    assert len(set(first.values())) == len(STAGES)
    assert all(len(k) == 64 for k in first.values())


@pytest.mark.parametrize("stage, dep", [
    ("prepare", "tasks/prepare.py"),
    ("prepare", "data/demo_subject/03.jpg"),        # via ${subject.images}
    ("supervise", "models/tiny/supervisor/model_index.json"),
    ("distill", "ar_models/llamagen.py"),
    ("distill", "models/tiny/llamagen/t2i.pt"),     # named by a param (student.checkpoint)
])
def test_key_follows_contents_not_mtime(project, tmp_path, stage, dep):
    params = load_params(project / "params.yaml")
    where = paths(project, stage)
    # Data deps live in the test folder; code deps are hashed in the project, here a copy of the one file.
    code = code_copy(tmp_path / "code", dep) if (REPO / dep).is_file() else None
    path = (code or project) / dep
    assert path.is_file()

    def key():
        return stage_key(stage, params, where, code)

    before = key()

    bump_mtime(path)
    path.touch()
    assert key() == before, "touching a dep without changing it must keep the key"

    original = path.read_bytes()
    flip_last_byte(path)
    changed = key()
    assert changed != before, "changing one byte of a dep must change the key"

    path.write_bytes(original)
    assert key() == before, "restoring the content restores the key"


def test_new_file_in_dep_folder_changes_key(project):
    params = load_params(project / "params.yaml")
    before = stage_key("prepare", params, paths(project, "prepare"))
    shutil.copy(project / "data/demo_subject/00.jpg", project / "data/demo_subject/04.jpg")
    assert stage_key("prepare", params, paths(project, "prepare")) != before


def test_renaming_a_file_in_a_dep_folder_changes_key(project):
    params = load_params(project / "params.yaml")
    before = stage_key("prepare", params, paths(project, "prepare"))
    os.replace(project / "data/demo_subject/00.jpg", project / "data/demo_subject/zz.jpg")
    assert stage_key("prepare", params, paths(project, "prepare")) != before


def test_copied_project_has_same_keys(project, tmp_path):
    """Input data copied elsewhere gives the same keys: deps given as paths are hashed by content, not place.
    (Where a stage writes is part of its key, so the outputs stay where they were.)"""
    params = load_params(project / "params.yaml")
    here = keys(params, project)
    other = tmp_path / "elsewhere" / "copy"
    shutil.copytree(project, other)
    # Different mtimes too: the copy was written later; push them further to be sure.
    for p in other.rglob("*"):
        if p.is_file():
            bump_mtime(p)

    def inputs_from_copy(stage: str) -> dict[str, Path]:
        written = set(cache.output_names(stage))
        return {name: (path if name in written else other / path.relative_to(project))
                for name, path in paths(project, stage).items()}

    assert {s: stage_key(s, params, inputs_from_copy(s)) for s in STAGES} == here
    assert {s: stage_key(s, load_params(other / "params.yaml"), inputs_from_copy(s)) for s in STAGES} == here


def test_student_param_changes_only_downstream_keys(project):
    params = load_params(project / "params.yaml")
    before = keys(params, project)
    for name, value in [("steps", 999), ("lora_rank", 16), ("learning_rate", 5e-4)]:
        changed = copy.deepcopy(params)
        changed["student"][name] = value
        after = keys(changed, project)
        for stage in ("distill", "evaluate"):
            assert after[stage] != before[stage], (name, stage)
        for stage in ("bootstrap", "prepare", "supervise", "synthesize"):
            assert after[stage] == before[stage], (name, stage)


def test_supervisor_steps_changes_supervise_key(project):
    params = load_params(project / "params.yaml")
    before = keys(params, project)
    changed = copy.deepcopy(params)
    changed["supervisor"]["steps"] = int(params["supervisor"]["steps"]) + 1
    after = keys(changed, project)
    assert after["supervise"] != before["supervise"]
    for stage in ("bootstrap", "prepare"):
        assert after[stage] == before[stage], stage


def test_subject_images_path_param_changes_prepare_key(project, tmp_path):
    """Pointing subject.images at different photos changes prepare's key (content of the new folder)."""
    params = load_params(project / "params.yaml")
    before = stage_key("prepare", params, paths(project, "prepare"))
    other = tmp_path / "other_photos"
    shutil.copytree(project / "data/demo_subject", other)
    flip_last_byte(other / "01.jpg")
    changed = copy.deepcopy(params)
    changed["subject"]["images"] = str(other)
    assert stage_key("prepare", changed, paths(project, "prepare")) != before


# ---------------------------------------------------------------- stamps


def make_outputs(root: Path) -> Path:
    out = paths(root, "prepare")["out"]
    (out / "instance").mkdir(parents=True)
    (out / "instance" / "00.png").write_bytes(b"png-bytes-0")
    (out / "captions.jsonl").write_text('{"file": "instance/00.png"}\n')
    return out


def test_stamp_marks_outputs_current(project, tmp_path):
    out = make_outputs(project)
    where = paths(project, "prepare")
    key = stage_key("prepare", load_params(project / "params.yaml"), where)
    assert not outputs_current("prepare", key, where), "no stamp yet"
    write_stamp("prepare", key, where)
    assert outputs_current("prepare", key, where)
    assert outputs_current("prepare", key, paths(project, "prepare"))
    assert not outputs_current("prepare", key, paths(tmp_path / "elsewhere", "prepare")), "outputs in another place"
    assert not outputs_current("prepare", "0" * 64, where), "a different key"
    assert not outputs_current("supervise", key, paths(project, "supervise")), "another stage has no stamp"

    bump_mtime(out / "captions.jsonl")
    assert outputs_current("prepare", key, where), "an mtime alone does not make outputs stale"


@pytest.mark.parametrize("change", ["modify", "append", "delete_file", "add_file", "delete_dir"])
def test_stamp_invalidated_by_output_change(project, change):
    out = make_outputs(project)
    where = paths(project, "prepare")
    key = stage_key("prepare", load_params(project / "params.yaml"), where)
    write_stamp("prepare", key, where)
    assert outputs_current("prepare", key, where)
    png = out / "instance" / "00.png"
    if change == "modify":
        flip_last_byte(png)
    elif change == "append":
        with open(out / "captions.jsonl", "a") as f:
            f.write("\n")
    elif change == "delete_file":
        png.unlink()
    elif change == "add_file":
        (out / "instance" / "01.png").write_bytes(b"stray")
    elif change == "delete_dir":
        shutil.rmtree(out)
    assert not outputs_current("prepare", key, where)


def test_stamp_checks_every_declared_output(project):
    """supervise declares a folder and a plot csv: losing either makes it stale."""
    where = paths(project, "supervise")
    where["out"].mkdir(parents=True)
    (where["out"] / "lora.safetensors").write_bytes(b"w")
    csv = where["loss_csv"]
    csv.write_text("step,loss\n0,1.0\n")
    key = stage_key("supervise", load_params(project / "params.yaml"), where)
    write_stamp("supervise", key, where)
    assert outputs_current("supervise", key, where)
    csv.unlink()
    assert not outputs_current("supervise", key, where)


def test_stamp_written_for_missing_outputs_is_not_current(project):
    where = paths(project, "prepare")
    key = stage_key("prepare", load_params(project / "params.yaml"), where)
    write_stamp("prepare", key, where)  # nothing in outputs/prepare
    assert not outputs_current("prepare", key, where)


def test_restamp_with_new_key(project):
    make_outputs(project)
    where = paths(project, "prepare")
    params = load_params(project / "params.yaml")
    old = stage_key("prepare", params, where)
    write_stamp("prepare", old, where)
    params["prepare"]["resolution"] += 16
    new = stage_key("prepare", params, where)
    assert new != old
    assert not outputs_current("prepare", new, where)
    write_stamp("prepare", new, where)
    assert outputs_current("prepare", new, where)
    assert not outputs_current("prepare", old, where)


def test_cache_dir_honours_env(project, monkeypatch, tmp_path):
    monkeypatch.setenv("PROXYTUNE_CACHE", str(tmp_path / "c"))
    path = cache_dir("codes")
    assert path == tmp_path / "c" / "codes" and path.is_dir()


# ---------------------------------------------------------------- atomic_dir


def _tmp_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((".out.tmp-", ".out.old-")))


def test_atomic_dir_failure_keeps_previous(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "keep.txt").write_text("previous")
    (final / "sub").mkdir()
    (final / "sub" / "x.bin").write_bytes(b"\x00\x01")

    seen = []
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(final) as tmp:
            seen.append(tmp)
            assert tmp.parent == final.parent and tmp.is_dir() and tmp != final
            (tmp / "keep.txt").write_text("half-written")
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")

    assert (final / "keep.txt").read_text() == "previous"
    assert (final / "sub" / "x.bin").read_bytes() == b"\x00\x01"
    assert not (final / "new.txt").exists()
    assert not seen[0].exists()
    assert _tmp_leftovers(tmp_path) == []


def test_atomic_dir_failure_without_previous_leaves_nothing(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as tmp:
            (tmp / "a").write_text("a")
            raise KeyboardInterrupt
    assert not final.exists()
    assert _tmp_leftovers(tmp_path) == []


def test_atomic_dir_success_replaces_content(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "stale.txt").write_text("old")
    with atomic_dir(final) as tmp:
        (tmp / "fresh.txt").write_text("new")
        assert (final / "stale.txt").exists(), "the old content stays visible until the block succeeds"
    assert sorted(p.name for p in final.iterdir()) == ["fresh.txt"]
    assert (final / "fresh.txt").read_text() == "new"
    assert _tmp_leftovers(tmp_path) == []


def test_atomic_dir_creates_missing_parents(tmp_path):
    final = tmp_path / "a" / "b" / "out"
    with atomic_dir(final) as tmp:
        (tmp / "f").write_text("x")
    assert (final / "f").read_text() == "x"
    assert _tmp_leftovers(final.parent) == []


# ---------------------------------------------------------------- path params, checked before hashing


@pytest.fixture
def no_hashing(monkeypatch):
    """Any content hash from here on fails the test: the checks must stop a bad path before hashing starts."""
    def refuse(path, *args):
        raise AssertionError(f"hashed {path}")

    for module in (cache, io):
        monkeypatch.setattr(module, "sha256_tree", refuse)
    monkeypatch.setattr(io, "sha256_file", refuse)


@pytest.mark.parametrize("stage, dotted, value", [
    ("prepare", "subject.images", "/etc"),                      # hundreds of files
    ("prepare", "subject.images", "/"),                         # the disk
    ("prepare", "subject.images", "params.yaml"),               # a file
    ("supervise", "subject.images", "models/tiny"),             # no photos
    ("supervise", "supervisor.model", "/"),                     # no model_index.json / config.json
    ("distill", "student.checkpoint", "params.yaml"),           # not a weights file
    ("distill", "student.text_encoder", "data/demo_subject"),   # a folder, but not a model's
    ("synthesize", "evaluate.dino", "/etc"),                    # via ${evaluate.dino} in synthesize's deps
    ("evaluate", "evaluate.clip_config_dir", "models/tiny/llamagen"),  # no config files
])
def test_path_param_of_the_wrong_kind_fails_before_hashing(project, no_hashing, stage, dotted, value):
    params = load_params(project / "params.yaml")
    section, key = dotted.split(".")
    params[section][key] = value if value.startswith("/") else str(project / value)
    with pytest.raises(ProxytuneError) as err:
        stage_key(stage, params, paths(project, stage))
    assert_one_line(err, dotted, params[section][key])


def test_cli_stops_on_a_bad_path_param_before_hashing(project, no_hashing, capsys):
    from flows.pipeline import main

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["subject"]["images"] = "/etc"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["--params", str(project / "params.yaml"), "--under", str(project), "--stage", "prepare"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: params: subject.images: '/etc' holds "), err


def test_good_layouts_pass(project):
    """The stand-in models have the layouts of the real ones: a file per weights, folders with their markers."""
    params = load_params(project / "params.yaml")
    for stage in STAGES:
        cache.check_path_params(stage, params)


def test_only_path_params_are_hashed(project):
    """A text param that happens to name an existing folder is a value, not a dependency."""
    notes = project / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("one")
    params = load_params(project / "params.yaml")
    params["supervisor"]["validation_prompt"] = str(notes)
    before = stage_key("supervise", params, paths(project, "supervise"))
    (notes / "a.txt").write_text("two")
    assert stage_key("supervise", params, paths(project, "supervise")) == before

"""Stage cache keys, derived from `dvc.yaml` so Prefect and DVC agree on what a stage depends on.

A stage's key hashes the *contents* of its deps (files and folders, never their paths' mtimes),
the values of its params, and the contents of the local photos and models its path params name (each checked,
before anything is hashed, for the layout it should have: a mistyped `/` must not hash the disk). A stamp
written after a successful run records the key and the hash of the outputs, so a cached result is
only reused while the outputs on disk are still the ones that run produced.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shlex
from pathlib import Path

import yaml

from proxytune.io import atomic_write_text, cache_dir, read_or_heal, sha256_json, sha256_tree
from proxytune.params import ProxytuneError, get

_INTERP = re.compile(r"\$\{([^}]+)\}")

# The params that name photos or models on disk, and what each must look like when it names a local path.
PATH_PARAMS = {
    "subject.images": "photos",
    "supervisor.model": "model",
    "student.checkpoint": "model",
    "student.vq_checkpoint": "model",
    "student.vq_config": "config",
    "student.text_encoder": "model",
    "student.tokenizer": "model",
    "evaluate.dino": "model",
    "evaluate.clip_pretrained": "model",
    "evaluate.clip_config_dir": "config",
    "evaluate.lpips_backbone": "model",
}
MAX_PHOTO_FILES = 500
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
MODEL_MARKERS = ("model_index.json", "config.json", "tokenizer_config.json")  # diffusers, transformers, tokenizer
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


@functools.lru_cache(maxsize=8)
def _dvc_stages(path: Path, mtime_ns: int) -> dict:
    """dvc.yaml's stages, parsed once per version of the file (a stage key reads them several times)."""
    return yaml.safe_load(path.read_text())["stages"]


def stage_spec(stage: str, project: Path | None = None) -> dict:
    path = (project or Path.cwd()) / "dvc.yaml"
    spec = _dvc_stages(path, path.stat().st_mtime_ns)
    if stage not in spec:
        raise KeyError(f"dvc.yaml has no stage {stage!r}")
    return spec[stage]


def _entries(items) -> list[tuple[str, dict]]:
    """dvc.yaml list entries are either 'path' or {'path': {options}}."""
    out = []
    for item in items or []:
        if isinstance(item, dict):
            out.extend((k, v or {}) for k, v in item.items())
        else:
            out.append((str(item), {}))
    return out


def _interpolate(text: str, params: dict) -> str:
    return _INTERP.sub(lambda m: str(get(params, m.group(1))), text)


def _path_hash(path: Path) -> str:
    return sha256_tree(path) if path.exists() else "missing"


def path_arguments(stage: str, project: Path | None = None) -> dict[str, str]:
    """The stage's path arguments as its dvc.yaml `cmd` passes them, by name (`--loss-csv X` is `loss_csv`):
    dvc.yaml is the one place that lays the project's data out."""
    words = shlex.split(stage_spec(stage, project)["cmd"])
    flags = {words[i][2:].replace("-", "_"): words[i + 1] for i in range(len(words) - 1)
             if words[i].startswith("--") and not words[i + 1].startswith("--")}
    return {name: value for name, value in flags.items() if name not in ("stage", "params")}


def stage_paths(stage: str, under: str | Path = ".", project: Path | None = None) -> dict[str, Path]:
    """The stage's paths laid out as in dvc.yaml, below `under` (another run's folder, or the project)."""
    return {name: Path(under) / value for name, value in path_arguments(stage, project).items()}


def output_names(stage: str, project: Path | None = None) -> list[str]:
    """The path arguments that name what the stage writes (its dvc.yaml outs, metrics and plots)."""
    spec = stage_spec(stage, project)
    written = {n for section in ("outs", "metrics", "plots") for n, _ in _entries(spec.get(section))}
    return [name for name, value in path_arguments(stage, project).items() if value in written]


def stage_key(stage: str, params: dict, paths: dict[str, Path], project: Path | None = None) -> str:
    """Code and shipped deps are hashed in the project; data deps at the paths this run was given, under
    their argument names, so the same inputs give the same key wherever a run keeps its data."""
    project = project or Path.cwd()
    spec = stage_spec(stage, project)
    check_path_params(stage, params, project)
    arguments = path_arguments(stage, project)
    written = output_names(stage, project)
    deps = {}
    for name, _ in _entries(spec.get("deps")):
        name = _interpolate(name, params)
        if name not in arguments.values():
            deps[name] = _path_hash(project / name)
    for name, path in paths.items():
        deps[f"--{name}"] = str(path) if name in written else _path_hash(Path(path))
    values = {name: get(params, name) for name, _ in _entries(spec.get("params"))}
    for _, value in _local_path_params(stage, params, project):
        if value not in deps:
            deps[value] = _path_hash(project / value)
    return sha256_json({"stage": stage, "deps": deps, "params": values})


def check_path_params(stage: str, params: dict, project: Path | None = None) -> None:
    """Each path param of `stage` that names a local path holds what it should (photos, a model), or a one-line
    error naming it; nothing is read beyond a few hundred directory entries."""
    project = project or Path.cwd()
    for dotted, value in _local_path_params(stage, params, project):
        path = project / value
        if PATH_PARAMS[dotted] == "photos":
            _check_photos(dotted, path)
        elif PATH_PARAMS[dotted] == "model":
            _check_layout(dotted, path, WEIGHT_SUFFIXES, MODEL_MARKERS, "a model: expected a weights file")
        else:
            _check_layout(dotted, path, CONFIG_SUFFIXES, (), "a config: expected a file")


def _local_path_params(stage: str, params: dict, project: Path) -> list[tuple[str, str]]:
    """(dotted name, value) of the stage's path params (those its dvc.yaml params or deps name) that name an
    existing local path; others are hub ids, tags or missing, which the stage itself reports."""
    spec = stage_spec(stage, project)
    declared = [name for name, _ in _entries(spec.get("params"))]
    declared += [m.group(1) for name, _ in _entries(spec.get("deps")) for m in _INTERP.finditer(name)]
    found = []
    for dotted in PATH_PARAMS:
        if not any(dotted == name or dotted.startswith(f"{name}.") for name in declared):
            continue
        value = _lookup(params, dotted)
        if isinstance(value, str) and value and (project / value).exists():
            found.append((dotted, value))
    return found


def _lookup(params: dict, dotted: str):
    node = params
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _check_photos(dotted: str, path: Path) -> None:
    if not path.is_dir():
        raise ProxytuneError(f"params: {dotted}: {str(path)!r} is not a folder (of the subject's photos)")
    count = 0
    for _, _, files in os.walk(path):
        count += len(files)
        if count > MAX_PHOTO_FILES:
            raise ProxytuneError(f"params: {dotted}: {str(path)!r} holds more than {MAX_PHOTO_FILES} files; "
                                 f"it must be a folder of the subject's photos")
    if not any(p.suffix.lower() in PHOTO_SUFFIXES for p in path.iterdir() if p.is_file()):
        raise ProxytuneError(f"params: {dotted}: {str(path)!r} holds no photos ({', '.join(PHOTO_SUFFIXES)})")


def _check_layout(dotted: str, path: Path, suffixes: tuple[str, ...], markers: tuple[str, ...], what: str) -> None:
    """A file with one of `suffixes`, or a folder holding one of `markers` (or, without markers, such a file)."""
    if path.is_file():
        ok = path.suffix.lower() in suffixes
    elif markers:
        ok = any((path / marker).is_file() for marker in markers)
    else:
        ok = any(p.suffix.lower() in suffixes for p in path.iterdir() if p.is_file())
    if not ok:
        held = f" or a folder holding {' or '.join(markers)}" if markers else " or a folder holding one"
        raise ProxytuneError(f"params: {dotted}: {str(path)!r} is not {what} ({', '.join(suffixes)}){held}")


def _outputs(stage: str, paths: dict[str, Path]) -> list[Path]:
    return [Path(paths[name]) for name in output_names(stage)]


def _stamp_path(stage: str, paths: dict[str, Path]) -> Path:
    """One stamp per stage and place: runs that keep their outputs elsewhere do not share stamps."""
    where = sha256_json(sorted(str(p.resolve()) for p in _outputs(stage, paths)))[:16]
    return cache_dir("stamps") / f"{stage}-{where}.json"


def _outputs_hash(stage: str, paths: dict[str, Path]) -> str:
    return sha256_json({str(p): _path_hash(p) for p in _outputs(stage, paths)})


def write_stamp(stage: str, key: str, paths: dict[str, Path]) -> None:
    stamp = {"key": key, "outputs": _outputs_hash(stage, paths)}
    atomic_write_text(_stamp_path(stage, paths), json.dumps(stamp))


def outputs_current(stage: str, key: str, paths: dict[str, Path]) -> bool:
    """True when the outputs on disk are exactly those a run with this key produced."""
    stamp = read_or_heal(_stamp_path(stage, paths), lambda path: dict(json.loads(path.read_text())))
    if stamp is None or stamp.get("key") != key:
        return False
    return all(p.exists() for p in _outputs(stage, paths)) and stamp.get("outputs") == _outputs_hash(stage, paths)


def checkpoint_dir(stage: str, params: dict, paths: dict[str, Path]) -> Path:
    """Where an interrupted run of `stage` with exactly these inputs left its training checkpoints."""
    return cache_dir("checkpoints") / stage / stage_key(stage, params, paths)[:20]

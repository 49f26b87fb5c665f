"""Stage cache keys, derived from `dvc.yaml` so Prefect and DVC agree on what a stage depends on.

A stage's key hashes the *contents* of its deps (files and folders, never their paths' mtimes),
the values of its params, and the contents of any local model path those params name. A stamp
written after a successful run records the key and the hash of the outputs, so a cached result is
only reused while the outputs on disk are still the ones that run produced.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import yaml

from proxytune.io import atomic_write_text, cache_dir, read_or_heal, sha256_json, sha256_tree
from proxytune.params import get

_INTERP = re.compile(r"\$\{([^}]+)\}")


def stage_spec(stage: str, project: Path | None = None) -> dict:
    project = project or Path.cwd()
    spec = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
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
    arguments = path_arguments(stage, project)
    written = output_names(stage, project)
    deps = {}
    for name, _ in _entries(spec.get("deps")):
        name = _interpolate(name, params)
        if name not in arguments.values():
            deps[name] = _path_hash(project / name)
    for name, path in paths.items():
        deps[f"--{name}"] = str(path) if name in written else _path_hash(Path(path))
    values = {}
    for name, _ in _entries(spec.get("params")):
        value = get(params, name)
        values[name] = value
        for leaf in _leaves(value):
            if isinstance(leaf, str) and leaf and (project / leaf).exists() and leaf not in deps:
                deps[leaf] = _path_hash(project / leaf)
    return sha256_json({"stage": stage, "deps": deps, "params": values})


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    else:
        yield value


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

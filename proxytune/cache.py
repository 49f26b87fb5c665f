"""Stage cache keys, derived from `dvc.yaml` so Prefect and DVC agree on what a stage depends on.

A stage's key hashes the *contents* of its deps (files and folders, never their paths' mtimes),
the values of its params, and the contents of any local model path those params name. A stamp
written after a successful run records the key and the hash of the outputs, so a cached result is
only reused while the outputs on disk are still the ones that run produced.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

from proxytune.io import atomic_write_text, sha256_json, sha256_tree
from proxytune.params import get

_INTERP = re.compile(r"\$\{([^}]+)\}")


def stage_spec(stage: str, root: Path | None = None) -> dict:
    root = root or Path.cwd()
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
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


def stage_key(stage: str, params: dict, root: Path | None = None) -> str:
    root = root or Path.cwd()
    spec = stage_spec(stage, root)
    deps = {}
    for name, _ in _entries(spec.get("deps")):
        name = _interpolate(name, params)
        deps[name] = _path_hash(root / name)
    values = {}
    for name, _ in _entries(spec.get("params")):
        value = get(params, name)
        values[name] = value
        for leaf in _leaves(value):
            if isinstance(leaf, str) and leaf and (root / leaf).exists() and leaf not in deps:
                deps[leaf] = _path_hash(root / leaf)
    return sha256_json({"stage": stage, "deps": deps, "params": values})


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    else:
        yield value


def stage_outputs(stage: str, root: Path | None = None) -> list[Path]:
    root = root or Path.cwd()
    spec = stage_spec(stage, root)
    names = [n for section in ("outs", "metrics", "plots") for n, _ in _entries(spec.get(section))]
    return [root / n for n in names]


def _stamp_path(stage: str, root: Path) -> Path:
    return root / ".proxytune" / "stamps" / f"{stage}.json"


def _outputs_hash(stage: str, root: Path) -> str:
    return sha256_json({str(p.relative_to(root)): _path_hash(p) for p in stage_outputs(stage, root)})


def write_stamp(stage: str, key: str, root: Path | None = None) -> None:
    root = root or Path.cwd()
    stamp = {"key": key, "outputs": _outputs_hash(stage, root)}
    atomic_write_text(_stamp_path(stage, root), json.dumps(stamp))


def outputs_current(stage: str, key: str, root: Path | None = None) -> bool:
    """True when the outputs on disk are exactly those a run with this key produced."""
    root = root or Path.cwd()
    path = _stamp_path(stage, root)
    if not path.is_file():
        return False
    stamp = json.loads(path.read_text())
    if stamp.get("key") != key:
        return False
    return all(p.exists() for p in stage_outputs(stage, root)) and stamp.get("outputs") == _outputs_hash(stage, root)


def cache_dir(kind: str, root: Path | None = None) -> Path:
    """Project-local content-addressed caches (token codes, embeddings) that outlive stage outputs."""
    root = root or Path.cwd()
    path = Path(os.environ.get("PROXYTUNE_CACHE", root / ".proxytune" / "cache")) / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def checkpoint_dir(stage: str, params: dict, root: Path | None = None) -> Path:
    """Where an interrupted run of `stage` with exactly these inputs left its training checkpoints."""
    return cache_dir("checkpoints", root) / stage / stage_key(stage, params, root)[:20]

"""Presets: partial params files (`presets/*.yaml`) that set a paper's configuration or a model choice.

`python -m orchestration.presets list` shows them; `python -m orchestration.presets apply NAME [NAME ...]` merges them,
in order, into params.yaml (comments and layout kept, written atomically), so `dvc repro` and the Prefect
flow pick them up like any edit. On a GPU machine only the model paths in a preset need changing.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from ruamel.yaml import YAML

from proxytune.io import atomic_write_text
from proxytune.params import ProxytuneError

PRESETS = Path(__file__).resolve().parent.parent / "presets"


def preset_path(name: str) -> Path:
    path = Path(name) if name.endswith(".yaml") else PRESETS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        raise ProxytuneError(f"preset {name!r}: no file {path} (known: {known})")
    return path


def read(name: str, yaml: YAML | None = None) -> dict:
    """The preset `name` (a name in presets/ or a .yaml path) as a mapping of params sections."""
    path = preset_path(name)
    overlay = (yaml or YAML(typ="safe")).load(path.read_text()) or {}
    if not isinstance(overlay, dict):
        raise ProxytuneError(f"{path}: a preset must be a mapping of params sections")
    return overlay


def merge(base, overlay, where: str = "") -> list[str]:
    """Deep-merge `overlay` into the mapping `base` in place (lists and scalars replace); returns changed keys."""
    changed = []
    for key, value in overlay.items():
        name = f"{where}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            changed += merge(base[key], value, f"{name}.")
        elif base.get(key) != value:
            base[key] = value
            changed.append(name)
    return changed


def apply(names: list[str], params_file: str | Path = "params.yaml") -> list[str]:
    """Merge the named presets into `params_file`; returns the keys whose values changed."""
    yaml = YAML()
    yaml.preserve_quotes = True
    params_file = Path(params_file)
    params = yaml.load(params_file.read_text())
    changed = []
    for name in names:
        overlay = read(name, yaml)
        unknown = [k for k in overlay if k not in params]
        if unknown:
            raise ProxytuneError(f"{preset_path(name)}: unknown params sections {unknown}")
        changed += merge(params, overlay)
    text = io.StringIO()
    yaml.dump(params, text)
    atomic_write_text(params_file, text.getvalue())
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    use = sub.add_parser("apply")
    use.add_argument("names", nargs="+")
    use.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    if args.command == "list":
        for path in sorted(PRESETS.glob("*.yaml")):
            first = path.read_text().splitlines()[0].lstrip("# ")
            print(f"{path.stem:36s} {first}")
        return 0
    try:
        changed = apply(args.names, args.params)
    except ProxytuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.params}: {len(changed)} values changed" + "".join(f"\n  {k}" for k in changed))
    return 0


if __name__ == "__main__":
    sys.exit(main())

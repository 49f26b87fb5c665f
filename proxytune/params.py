"""Reading and checking `params.yaml`: every bad value stops with one line naming the parameter."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# A missing `models/x` is a local path that is not there yet, not the hub organisation "models".
PROJECT_FOLDERS = ("models", "data", "outputs")


class ProxytuneError(Exception):
    """A user-facing error: the CLI prints its message as one line, without a traceback."""


def read_params(path: str | Path) -> dict:
    """The parsed params file, unchecked: a mapping of sections or a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ProxytuneError(f"{path}: params file not found")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ProxytuneError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError as e:
        raise ProxytuneError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(params, dict):
        raise ProxytuneError(f"{path}: must be a mapping of sections")
    return params


def load_params(path: str | Path = "params.yaml") -> dict:
    """The params file checked against `proxytune.schema` (before any stage runs), as a plain dict with every
    default filled in; the first violation is a one-line error naming the dotted key, its value and the rule."""
    from proxytune.schema import problems, validate

    try:
        return validate(read_params(path))
    except ValidationError as e:
        lines = problems(e)
        more = f" (and {len(lines) - 1} more: `proxytune params --check {path}` lists all)" if len(lines) > 1 else ""
        raise ProxytuneError(lines[0] + more) from None


def get(params: dict, dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ProxytuneError(f"params: missing required parameter {dotted}")
        node = node[part]
    return node


def local_path(params: dict, dotted: str, kind: str = "path") -> Path:
    """A parameter that must name an existing local file or folder."""
    value = str(get(params, dotted))
    path = Path(value)
    if not path.exists():
        raise ProxytuneError(f"params: {dotted}: {kind} {value!r} does not exist")
    return path


def model_source(params: dict, dotted: str) -> str:
    """A local model folder, or a hub id (`org/name`) that only a machine with hub access can use."""
    value = str(get(params, dotted))
    if Path(value).exists():
        return value
    if HUB_ID.match(value) and value.split("/")[0] not in PROJECT_FOLDERS:
        return value
    raise ProxytuneError(f"params: {dotted}: {value!r} is neither an existing local path nor a hub id")


def main(argv: list[str] | None = None) -> int:
    """`proxytune params`: the schema as documentation, or `--check FILE` listing every violation."""
    from proxytune import schema

    parser = argparse.ArgumentParser(prog="proxytune params", description="Print every parameter of params.yaml "
                                     "(type, rule, default, meaning), or check a params file.")
    parser.add_argument("--check", metavar="FILE", help="validate FILE; print every violation, one per line")
    args = parser.parse_args(argv)
    if args.check is None:
        print("\n".join(schema.describe()).lstrip("\n"))
        return 0
    try:
        schema.validate(read_params(args.check))
    except ProxytuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:
        print("\n".join(f"error: {args.check}: {line}" for line in schema.problems(e)), file=sys.stderr)
        return 2
    print(f"{args.check}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())

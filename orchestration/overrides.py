"""Typed parameter overrides for a run launched from Prefect's UI: the params schema with every key optional.

`Overrides` mirrors `proxytune.schema.Params` (same sections, types, choices and descriptions), so Prefect's
Run form lets a user start a run for a new subject (photos folder, class noun, method, steps) without editing
params.yaml. The keys filled in replace params.yaml's values; the result is checked against the full schema
before any stage starts, and written where every stage of the run reads it (its cache keys included).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from proxytune import schema
from proxytune.io import atomic_write_text, sha256_json
from proxytune.params import ProxytuneError, read_params


def _optional(model: type[BaseModel]) -> type[BaseModel]:
    """`model` with every field optional (None: keep params.yaml's value), nested sections likewise."""
    fields = {}
    for name, info in model.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            kind = _optional(kind)
        fields[name] = (Optional[kind], Field(None, description=info.description))
    return create_model(f"{model.__name__}Overrides", __config__=ConfigDict(extra="forbid"),
                        __doc__=model.__doc__, **fields)


Overrides = _optional(schema.Params)


def as_dict(overrides: BaseModel | dict | None) -> dict:
    """The keys a user filled in, as a nested dict (a null means: not overridden)."""
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        overrides = Overrides.model_validate(overrides)
    return overrides.model_dump(exclude_none=True)


def merged(raw: dict, overrides: dict) -> dict:
    return {**raw, **{k: merged(raw.get(k) or {}, v) if isinstance(v, dict) else v for k, v in overrides.items()}}


def effective_params(params_file: str | Path, overrides: BaseModel | dict | None) -> dict:
    """params.yaml with `overrides` applied, checked against the schema (one-line error naming the key)."""
    raw = merged(read_params(params_file), as_dict(overrides))
    try:
        return schema.validate(raw)
    except ValidationError as e:
        raise ProxytuneError(schema.problems(e)[0]) from None


def write_params(params_file: str | Path, overrides: BaseModel | dict | None, folder: Path) -> str:
    """`params_file` itself when nothing is overridden, else the overridden params written to
    `folder/<hash>.yaml`: the file the run's stages read. Either is checked against the schema first."""
    params = effective_params(params_file, overrides)
    if not as_dict(overrides):
        return str(params_file)
    path = Path(folder) / f"{sha256_json(params)[:16]}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(params, sort_keys=False))
    return str(path)


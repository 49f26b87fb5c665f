"""AR student families behind one interface (`ar_models.base.ARStudent`), chosen by name in params."""
from __future__ import annotations

from importlib import import_module
from pathlib import Path

import torch

from ar_models.base import ARStudent, ModelConfigError, PromptBatch

# family name -> (module, class); modules load lazily so a family's heavy imports cost nothing unused.
FAMILIES = {
    "llamagen": ("ar_models.llamagen", "LlamaGenStudent"),
    "lumina_mgpt": ("ar_models.lumina_mgpt", "LuminaMGPTStudent"),
    "janus_pro": ("ar_models.janus_pro", "JanusProStudent"),
    "var": ("ar_models.var", "VARStudent"),
    "infinity": ("ar_models.infinity", "InfinityStudent"),
}

__all__ = ["ARStudent", "ModelConfigError", "PromptBatch", "FAMILIES", "load_student", "require_file"]


def load_student(student: dict) -> ARStudent:
    """Build the student that `params.yaml`'s `student` section names (via the family's `from_params`),
    failing with a one-line `ModelConfigError` that names the parameter on unknown families, missing files or
    bad sizes."""
    family = student.get("family")
    if family not in FAMILIES:
        raise ModelConfigError(f"params: student.family: unknown model family {family!r} (known: {', '.join(FAMILIES)})")
    module, cls = FAMILIES[family]
    device = resolve_device(student.get("device", "auto"))
    try:
        return getattr(import_module(module), cls).from_params(student).to(device)
    except KeyError as e:
        raise ModelConfigError(f"params: student.{e.args[0]}: required for family {family!r}") from None
    except (ValueError, OSError) as e:
        raise ModelConfigError(f"params: student: {e}") from None


def require_file(student: dict, key: str, folder: bool = False) -> str:
    """The path `student[key]` names, or a one-line error naming the parameter: a weights file, or with
    `folder` a directory (a `save_pretrained` folder)."""
    path = str(student[key])
    ok = Path(path).is_dir() if folder else Path(path).is_file()
    if not ok:
        raise FileNotFoundError(f"student.{key}: {'folder' if folder else 'weights file'} {path!r} does not exist")
    return path


def resolve_device(name: str) -> torch.device:
    """`student.device`: 'auto' picks CUDA when present, else CPU; or any torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ModelConfigError(f"params: student.device: {name!r} is not a torch device (or 'auto')") from None

"""AR student families behind one interface (`ar_models.base.ARStudent`), chosen by name in params."""
from __future__ import annotations

from importlib import import_module
from pathlib import Path

from ar_models.base import ARStudent, PromptBatch

# family name -> (module, class); modules load lazily so a family's heavy imports cost nothing unused.
FAMILIES = {"llamagen": ("ar_models.llamagen", "LlamaGenStudent")}

__all__ = ["ARStudent", "PromptBatch", "FAMILIES", "load_student"]


def load_student(student: dict) -> ARStudent:
    """Build the student that `params.yaml`'s `student` section names, failing on unknown names or paths."""
    from proxytune.params import ProxytuneError

    family = student.get("family")
    if family not in FAMILIES:
        raise ProxytuneError(f"params: student.family: unknown model family {family!r} (known: {', '.join(FAMILIES)})")
    for key in ("checkpoint", "vq_checkpoint"):
        if not Path(str(student.get(key))).is_file():
            raise ProxytuneError(f"params: student.{key}: weights file {student.get(key)!r} does not exist")
    module, cls = FAMILIES[family]
    try:
        return getattr(import_module(module), cls).from_paths(
            checkpoint=student["checkpoint"], vq_checkpoint=student["vq_checkpoint"],
            text_encoder=student["text_encoder"], size=student["size"], vq_size=student["vq_size"],
            image_size=int(student["image_size"]),
        )
    except (KeyError, ValueError) as e:
        raise ProxytuneError(f"params: student: {e}") from None

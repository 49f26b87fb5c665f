"""Tuned adapters as MLflow models: logged with their stage's run and registered per subject.

`mlflow.pyfunc.load_model("models:/proxytune-<subject>-student/latest")` (or `-supervisor`) gives a model whose
`predict` takes a DataFrame with a `prompt` column (and the param `seed`) and returns the images as uint8 arrays
(N, H, W, 3), drawn exactly as the project draws them: `load_tuned(...).generate` for the student, the DreamBooth
pipeline's `sample` for the supervisor. Each model holds its adapter folder with a `card.json` (the student's is
the distill stage's own; the supervisor's says how to sample) and imports the project to load it: proxytune is
pip-installed (editable), so no code is copied into the model. Base weights are referenced, not copied: the
paths the card names are made absolute when logging, so the model loads from any working directory of this
machine.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from proxytune.tuning import CARD_FILE

ROLES = ("student", "supervisor")
REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements.lock"  # the exact versions it ran with
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "prompt")]),
    outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
    params=ParamSchema([ParamSpec("seed", "long", 0)]),
)


def registered_name(role: str, subject: str) -> str:
    return f"proxytune-{subject}-{role}"


def _arrays(images) -> np.ndarray:
    """PIL images -> uint8 (N, H, W, 3)."""
    return np.stack([np.asarray(img.convert("RGB")) for img in images])


def _absolute(section: dict) -> dict:
    """`section` with every value naming an existing file or folder made absolute."""
    return {k: str(Path(v).resolve()) if isinstance(v, str) and v and Path(v).exists() else v
            for k, v in section.items()}


class TunedStudentModel(mlflow.pyfunc.PythonModel):
    """The AR student with its tuned artifacts (`proxytune.tuning.load_tuned`)."""

    def load_context(self, context):
        from proxytune.tuning import load_tuned

        self.tuned = load_tuned(context.artifacts["student"], context.model_config["student"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        from proxytune.images import to_pil

        seed = int((params or {}).get("seed", 0))
        return _arrays(to_pil(self.tuned.generate(list(model_input["prompt"]), seed=seed)))


class SupervisorModel(mlflow.pyfunc.PythonModel):
    """The diffusion supervisor with its DreamBooth LoRA, sampling as the evaluate stage does: prompts name the
    subject by its identifier ('a sks toy'), read as the learned tokens after pivotal tuning."""

    def load_context(self, context):
        from proxytune.diffusion import learned_token, load_pipeline

        folder = Path(context.artifacts["supervisor"])
        self.card = json.loads((folder / CARD_FILE).read_text())
        self.pipe = load_pipeline(self.card["model"], lora_dir=folder)
        self.token = learned_token(folder)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        from proxytune.diffusion import sample
        from proxytune.prompts import with_token

        card, seed = self.card, int((params or {}).get("seed", 0))
        prompts = [with_token(p, card["identifier"], self.token) for p in model_input["prompt"]]
        images = sample(self.pipe, prompts, [seed + i for i in range(len(prompts))], card["sample_steps"],
                        card["guidance_scale"], resolution=card["resolution"])
        return _arrays(images)


def _supervisor_folder(lora_dir: Path, params: dict, into: Path) -> Path:
    """The LoRA's files (not its class images) and a card saying which base model and how it samples."""
    into.mkdir()
    for f in lora_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, into / f.name)
    s = params["supervisor"]
    card = {"role": "supervisor", "model": _absolute({"model": s["model"]})["model"],
            "sample_steps": int(s["sample_steps"]), "guidance_scale": float(s["guidance_scale"]),
            "resolution": int(params["prepare"]["resolution"]), "identifier": params["subject"]["identifier"],
            "class_noun": params["subject"]["class_noun"]}
    (into / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True))
    return into


def log_model(role: str, folder: Path, params: dict) -> str:
    """Log `folder` (distill's output for the student, supervise's for the supervisor) as a pyfunc model of the
    active run, registered as `registered_name(role, subject)`; returns the model's URI."""
    subject = params["subject"]["name"]
    with tempfile.TemporaryDirectory() as tmp:
        if role == "student":
            model, artifacts, config = TunedStudentModel(), {"student": str(folder)}, {
                "student": _absolute(params["student"])}
        elif role == "supervisor":
            model, config = SupervisorModel(), {}
            artifacts = {"supervisor": str(_supervisor_folder(folder, params, Path(tmp) / "supervisor"))}
        else:
            raise ValueError(f"model role must be one of {', '.join(ROLES)}, got {role!r}")
        with warnings.catch_warnings():  # an input example would make MLflow load and run the model here
            warnings.filterwarnings("ignore", message=".*An input example was not provided")
            info = mlflow.pyfunc.log_model(
                name=role, python_model=model, artifacts=artifacts, model_config=config, signature=SIGNATURE,
                pip_requirements=str(REQUIREMENTS), registered_model_name=registered_name(role, subject),
                tags={"subject": subject, "role": role},
            )
    return info.model_uri

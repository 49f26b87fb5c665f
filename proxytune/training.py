"""The training loop both recipes share: steps, per-step logging, periodic checkpoints, exact resume.

A recipe provides `train_step() -> dict of losses`, plus `trainable` (the module whose parameters with
`requires_grad` are trained), `optimizer`, `generator` (the torch.Generator its batches come from) and, for fp16, `scaler`.
Checkpoints live outside the stage's outputs, keyed by the stage's cache key, so a run killed halfway
resumes where it stopped when started again with the same inputs, and ends bit-identical to an
uninterrupted run.
"""
from __future__ import annotations

import csv
import io
import logging
import shutil
from pathlib import Path

import torch

from proxytune.io import atomic_file, atomic_write_text, read_or_heal
from proxytune.progress import Progress

logger = logging.getLogger(__name__)


def recipe_state(recipe) -> dict:
    return {
        "trainable": {n: p.detach().clone() for n, p in recipe.trainable.named_parameters() if p.requires_grad},
        "optimizer": recipe.optimizer.state_dict(),
        "generator": recipe.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        # fp16 recipes carry a GradScaler whose scale must resume too, or the run is not bit-exact
        **({"scaler": recipe.scaler.state_dict()} if getattr(recipe, "scaler", None) is not None else {}),
    }


def load_recipe_state(recipe, state: dict) -> None:
    params = dict(recipe.trainable.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    recipe.optimizer.load_state_dict(state["optimizer"])
    recipe.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if "scaler" in state:
        recipe.scaler.load_state_dict(state["scaler"])


class Checkpointer:
    """Keeps the newest checkpoint of a run in `folder`, written every `every` steps (0: never)."""

    def __init__(self, folder: Path, every: int):
        self.folder, self.every = Path(folder), int(every)

    def latest(self) -> tuple[Path, dict] | None:
        """The newest readable checkpoint and its path; an unreadable one is deleted (training redoes its steps)."""
        for path in sorted(self.folder.glob("step-*.pt"), reverse=True):
            state = read_or_heal(path, lambda p: torch.load(p, map_location="cpu", weights_only=True), "checkpoint")
            if state is not None:
                return path, state
        return None

    def save(self, step: int, state: dict) -> None:
        with atomic_file(self.folder / f"step-{step:07d}.pt") as tmp:
            torch.save(state, tmp)
        for old in sorted(self.folder.glob("step-*.pt"))[:-1]:
            old.unlink()

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def train(recipe, steps: int, log, checkpoints: Checkpointer, name: str = "training") -> list[dict]:
    """Run `steps` train steps (resuming from the newest checkpoint); returns the per-step loss history.
    `name` (the stage) is what the log lines about a resume and the progress name, so a user sees why a run
    was quick and how far it is."""
    history, start = [], 0
    found = checkpoints.latest()
    if found is not None:
        path, state = found
        logger.info("resuming %s from step %d (checkpoint %s)", name, state["step"], path)
        load_recipe_state(recipe, state["recipe"])
        history, start = state["history"], state["step"]
    with Progress(name, steps, start=start) as bar:
        for step in range(start + 1, steps + 1):
            losses = recipe.train_step()
            history.append({"step": step, **losses})
            log.metrics(losses, step=step)
            if checkpoints.due(step):
                checkpoints.save(step, {"recipe": recipe_state(recipe), "history": history, "step": step})
            bar.advance(**losses)
    return history


def write_loss_csv(path: str | Path, history: list[dict]) -> None:
    """The per-step losses as CSV (step first), the file `dvc plots show` reads."""
    fields = list(history[0]) if history else ["step", "loss"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, text.getvalue())

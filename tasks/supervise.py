"""Stage `supervise`: DreamBooth-LoRA on the diffusion supervisor (any family), wired from `params.yaml`.

The recipe lives in `proxytune.dreambooth`; this stage reads the prepared images and their captions, runs
the steps with checkpoints (and validation images to MLflow every `validation_every` steps), and writes the
LoRA (diffusers format, optionally kohya too), pivotal-tuning embeddings and the class images it used.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from proxytune.cache import checkpoint_dir
from proxytune.dreambooth import LORA_FILE, DreamBoothConfig, DreamBoothLoRA, ValidatingLogger
from proxytune.io import atomic_dir, read_jsonl
from proxytune.params import ProxytuneError, get, model_source
from proxytune.prompts import CAPTION
from proxytune.stage import stage_task
from proxytune.training import Checkpointer, train, write_loss_csv

# supervisor.<key> -> type; each becomes the DreamBoothConfig field of the same name when present.
FIELDS = {
    "lora_rank": int, "lora_alpha": int, "lora_dropout": float, "target_modules": list, "learning_rate": float,
    "train_text_encoder": bool, "text_encoder_lr": float, "steps": int, "batch_size": int,
    "prior_preservation": bool, "prior_loss_weight": float, "num_class_images": int, "class_batch_size": int,
    "sample_steps": int, "guidance_scale": float, "scheduler": str, "mixed_precision": str,
    "gradient_checkpointing": bool, "cache_latents": bool, "snr_gamma": float, "weighting_scheme": str,
    "logit_mean": float, "logit_std": float, "mode_scale": float, "flux_guidance": float, "pivotal_tokens": int,
    "validation_prompt": str, "num_validation_images": int,
}


def _typed(key: str, value, kind):
    """A supervisor parameter as `kind`; null means the recipe's default."""
    if kind is bool and not isinstance(value, bool) or kind is list and not isinstance(value, list):
        raise ProxytuneError(f"params: supervisor.{key} must be a {kind.__name__}, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ProxytuneError(f"params: supervisor.{key} must be a {kind.__name__}, got {value!r}") from None


def recipe_config(params: dict, images: list[Path], captions: list[str]) -> DreamBoothConfig:
    s = get(params, "supervisor")
    values = {k: _typed(k, s[k], kind) for k, kind in FIELDS.items() if s.get(k) is not None}
    return DreamBoothConfig(
        model=model_source(params, "supervisor.model"), instance_images=images, instance_prompt=captions,
        class_prompt=CAPTION.format(get(params, "subject.class_noun")), identifier=str(get(params, "subject.identifier")),
        seed=int(get(params, "seed")), **values,
    )


def run(params: dict, log) -> dict:
    """Train the supervisor's LoRA on the prepared images, each with its own caption; write it and the class images."""
    prepared = Path("outputs/prepare")
    rows = read_jsonl(prepared / "captions.jsonl")
    cfg = recipe_config(params, [prepared / r["file"] for r in rows], [r["caption"] for r in rows])
    recipe = DreamBoothLoRA(cfg)
    recipe.setup()
    s = params["supervisor"]
    checkpoints = Checkpointer(checkpoint_dir("supervise", params), int(s.get("checkpoint_every") or 0))
    with tempfile.TemporaryDirectory(prefix="proxytune-validation-") as validation:
        logger = ValidatingLogger(log, recipe, int(s.get("validation_every") or 0), Path(validation))
        history = train(recipe, cfg.steps, logger, checkpoints)
    out = Path("outputs/supervise")
    with atomic_dir(out) as tmp:
        recipe.save(tmp, export_kohya=bool(s.get("export_kohya", False)))
        (tmp / "class_images").mkdir()
        for i, img in enumerate(recipe.class_images):
            img.save(tmp / "class_images" / f"{i:03d}.png")
    write_loss_csv("outputs/supervise_loss.csv", history)
    checkpoints.clear()
    log.artifact(out / LORA_FILE, "lora")
    return {"lora_dir": str(out), "loss_csv": "outputs/supervise_loss.csv"}


supervise_task = stage_task("supervise", run)

"""Stage `supervise`: DreamBooth-LoRA on the diffusion supervisor (any family), wired from `params.yaml`.

The recipe lives in `proxytune.dreambooth`; this stage reads the prepared images and their captions, runs
the steps with checkpoints (and validation images to MLflow every `validation_every` steps), and writes the
LoRA (diffusers format, optionally kohya too), pivotal-tuning embeddings and the class images it used.

`accelerate launch --num_processes N -m tasks.supervise` trains the same LoRA data-parallel on N devices
(`supervisor.batch_size` stays the global batch); its main process writes the outputs and leaves the final
checkpoint, from which the stage (`dvc repro`) then publishes without training again (docs/scale.md).
"""
from __future__ import annotations

import os
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

from orchestration.cache import checkpoint_dir
from proxytune.dreambooth import LORA_FILE, DreamBoothConfig, DreamBoothLoRA, ValidatingLogger
from proxytune.io import atomic_dir, read_jsonl
from proxytune.params import ProxytuneError, get, load_params, model_source
from proxytune.prompts import class_prompt
from proxytune.training import Checkpointer, train, write_loss_csv

# supervisor.<key>s that become the DreamBoothConfig field of the same name (null: the recipe's default).
FIELDS = (
    "lora_rank", "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "train_text_encoder",
    "text_encoder_lr", "steps", "batch_size", "prior_preservation", "prior_loss_weight", "num_class_images",
    "class_batch_size", "sample_steps", "guidance_scale", "scheduler", "mixed_precision", "gradient_checkpointing",
    "cache_latents", "snr_gamma", "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "flux_guidance",
    "pivotal_tokens", "validation_prompt", "num_validation_images",
)


def recipe_config(params: dict, images: list[Path], captions: list[str]) -> DreamBoothConfig:
    s = get(params, "supervisor")
    values = {k: s[k] for k in FIELDS if s[k] is not None}
    return DreamBoothConfig(
        model=model_source(params, "supervisor.model"), instance_images=images, instance_prompt=captions,
        class_prompt=class_prompt(params), identifier=get(params, "subject.identifier"),
        seed=get(params, "seed"), **values,
    )


class FinalCheckpointer(Checkpointer):
    """Also checkpoints the last step: the state a multi-process run hands to the stage that publishes it."""

    def __init__(self, folder: Path, every: int, last: int):
        super().__init__(folder, every)
        self.last = last

    def due(self, step: int) -> bool:
        return super().due(step) or step == self.last


class Silent:
    """The logger of the processes other than the main one."""

    def metrics(self, values, step=None):
        pass

    def artifact(self, path, folder=None):
        pass


def train_lora(params: dict, log, paths: dict[str, Path], process=None) -> tuple[DreamBoothLoRA, list[dict], Checkpointer]:
    """The trained recipe, its loss history and its checkpoints. With `process` (accelerate's PartialState),
    this process trains on its slice of every batch; only the main one logs and checkpoints (the last step too)."""
    prepared = paths["prepared"]
    rows = read_jsonl(prepared / "captions.jsonl")
    cfg = recipe_config(params, [prepared / r["file"] for r in rows], [r["caption"] for r in rows])
    recipe = DreamBoothLoRA(cfg, process)
    recipe.setup()
    s = params["supervisor"]
    folder, every = checkpoint_dir("supervise", params, paths), s["checkpoint_every"]
    main = process is None or process.is_main_process
    if process is None:
        checkpoints = Checkpointer(folder, every)
    else:  # the others only read the folder, to resume
        checkpoints = FinalCheckpointer(folder, every, cfg.steps) if main else Checkpointer(folder, 0)
    with tempfile.TemporaryDirectory(prefix="proxytune-validation-") as validation:
        validation_every = s["validation_every"] if main else 0
        logger = ValidatingLogger(log, recipe, validation_every, Path(validation))
        history = train(recipe, cfg.steps, logger, checkpoints, "supervise")
    return recipe, history, checkpoints


def publish(params: dict, recipe: DreamBoothLoRA, history: list[dict], paths: dict[str, Path]) -> dict:
    """Write `paths["out"]` (LoRA, embeddings, class images) and the loss CSV."""
    out = paths["out"]
    with atomic_dir(out) as tmp:
        recipe.save(tmp, export_kohya=params["supervisor"]["export_kohya"])
        (tmp / "class_images").mkdir()
        for i, img in enumerate(recipe.class_images):
            img.save(tmp / "class_images" / f"{i:03d}.png")
    write_loss_csv(paths["loss_csv"], history)
    return {"lora_dir": str(out), "loss_csv": str(paths["loss_csv"])}


def run(params: dict, log, paths: dict[str, Path]) -> dict:
    """Train the supervisor's LoRA on the prepared images, each with its own caption; write it and the class images.
    After `accelerate launch -m tasks.supervise` it finds the final checkpoint and only publishes."""
    recipe, history, checkpoints = train_lora(params, log, paths)
    result = publish(params, recipe, history, paths)
    checkpoints.clear()
    log.artifact(Path(result["lora_dir"]) / LORA_FILE, "lora")
    return result


def check_launch_precision(params: dict) -> None:
    """The precision is a param (it keys the stage's cache); a launch flag naming another one is a mistake."""
    flag = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # accelerate's "no": no opinion
    ours = get(params, "supervisor.mixed_precision")
    if flag not in ("no", ours):
        raise ProxytuneError(f"accelerate launch --mixed_precision {flag} disagrees with params: "
                             f"supervisor.mixed_precision {ours!r}; set the precision in params.yaml and launch with "
                             "--mixed_precision no (or the same value)")


def main(argv: list[str] | None = None) -> int:
    """Under `accelerate launch`: every process trains on its slice of each batch; the main process logs to
    MLflow, checkpoints and writes the outputs. The stage (`dvc repro`) then publishes from the final checkpoint."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from orchestration import tracking
    from orchestration.stage import launched_stage_args, stage_params

    # `accelerate launch --cpu` sets this flag, which PartialState (unlike Accelerator) leaves to its caller
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    try:
        params_file, paths = launched_stage_args("supervise", argv)
        params = load_params(params_file)
        check_launch_precision(params)
        main_process = state.is_main_process
        logging = (tracking.stage_run("supervise", params, stage_params("supervise", params)) if main_process
                   else nullcontext(Silent()))
        with logging as log:
            recipe, history, _ = train_lora(params, log, paths, state)
            if main_process:
                publish(params, recipe, history, paths)
    except ProxytuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())

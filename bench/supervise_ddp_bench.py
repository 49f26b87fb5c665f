"""Data-parallel supervisor training: the `supervise` stage in one process vs two under accelerate (gloo, CPU).

In a throw-away project (tiny SD1.5 supervisor, bootstrap + prepare run here), the stage trains once in this
process and once as `accelerate launch --cpu --num_processes 2 -m tasks.supervise`, each process on half of
every global batch. Required (the bench fails otherwise): the two LoRAs agree to float rounding, the losses
too, and the stage run after the launch publishes the launch's LoRA as it is without training again.
Then the recipe alone, on the tiny SDXL replica with text-encoder LoRA and pivotal tokens (gradients of the
text encoders too) and on the SD3 replica (flow matching): 2 gloo processes vs 1, same tolerance.
Writes bench/results/supervise_ddp.json.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SUPERVISOR = {"steps": 6, "batch_size": 4, "num_class_images": 2, "sample_steps": 2, "checkpoint_every": 0,
              "learning_rate": 1e-3}
# fp32 gradients of two halves are summed in another order than the whole batch's; AdamW divides each gradient
# by its running RMS, so where one is near zero that rounding can move a weight by up to lr per step. The check:
# far below the scale of the training's own updates (learning_rate x steps = 6e-3).
TOLERANCE = 1e-4


class Log:
    def __init__(self):
        self.steps = []

    def metrics(self, values, step=None):
        self.steps.append(step)

    def artifact(self, path, folder=None):
        pass


class Lora(dict):
    """A LoRA file's tensors and metadata; equal when both are (the header's key order varies by process)."""

    def __eq__(self, other):
        return self.metadata == other.metadata and self.keys() == other.keys() and all(
            torch.equal(v, other[k]) for k, v in self.items())


def lora(out: Path) -> Lora:
    from safetensors import safe_open

    from proxytune.dreambooth import LORA_FILE

    with safe_open(str(out / LORA_FILE), "pt") as f:
        tensors = Lora({k: f.get_tensor(k) for k in f.keys()})
        tensors.metadata = f.metadata()
    return tensors


def losses(path: Path) -> list[float]:
    with open(path, newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


RECIPES = {"sdxl": {"train_text_encoder": True, "pivotal_tokens": 2},
           "sd3": {"weighting_scheme": "logit_normal", "pivotal_tokens": 0}}


def recipe_lora(root: Path, family: str, process=None) -> dict[str, torch.Tensor]:
    from proxytune.dreambooth import DreamBoothConfig, DreamBoothLoRA

    cfg = DreamBoothConfig(model=str(root / family), instance_images=sorted((root / "instance").glob("*.png")),
                           instance_prompt="a photo of sks toy", class_prompt="a photo of toy", learning_rate=1e-3,
                           steps=SUPERVISOR["steps"], batch_size=SUPERVISOR["batch_size"], num_class_images=2,
                           class_batch_size=2, sample_steps=2, seed=0, **RECIPES[family])
    recipe = DreamBoothLoRA(cfg, process)
    recipe.setup()
    for _ in range(cfg.steps):
        recipe.train_step()
    return {n: p.detach().clone() for n, p in recipe.trainable.named_parameters() if p.requires_grad}


def recipe_worker(rank: int, root: Path, family: str) -> None:
    """One of two gloo processes (torch.multiprocessing.spawn); the main one saves the trained weights."""
    from accelerate import PartialState

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531", RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    weights = recipe_lora(root, family, PartialState(cpu=True))
    if rank == 0:
        torch.save(weights, root / f"{family}-2proc.pt")


def bench_recipes() -> dict:
    import numpy as np
    from PIL import Image

    from proxytune.prompts import corpus_words
    from testbed.tiny_supervisors import build_tiny_pipeline

    root = Path(tempfile.mkdtemp(prefix="proxytune-recipe-ddp-"))
    os.environ["PROXYTUNE_CACHE"] = str(root / "cache")
    rng = np.random.default_rng(0)
    (root / "instance").mkdir()
    for i in range(3):
        blobs = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        Image.fromarray(blobs).resize((64, 64), Image.Resampling.BICUBIC).save(root / "instance" / f"{i}.png")
    rows = {}
    for family in RECIPES:
        build_tiny_pipeline(family, root / family, corpus_words(), seed=0)
        single = recipe_lora(root, family)
        torch.multiprocessing.spawn(recipe_worker, args=(root, family), nprocs=2)
        two = torch.load(root / f"{family}-2proc.pt", weights_only=True)
        if two.keys() != single.keys():
            raise SystemExit(f"{family}: 2-process recipe trains other tensors than 1 process")
        diff = max((two[k] - single[k]).abs().max().item() for k in single)
        rows[family] = {**RECIPES[family], "lora_max_abs_diff": diff}
        print(f"recipe {family} {RECIPES[family]}: max |2 proc - 1 proc| over {len(single)} trained tensors = "
              f"{diff:.3g}")
        if diff > TOLERANCE:
            raise SystemExit(f"{family}: 2-process recipe differs from 1 process by {diff:.3g} > {TOLERANCE}")
    shutil.rmtree(root, ignore_errors=True)
    return rows


def bench_stage() -> dict:
    import yaml

    from orchestration.cache import checkpoint_dir, stage_paths
    from proxytune.params import load_params
    from tasks import bootstrap, prepare, supervise

    work = Path(tempfile.mkdtemp(prefix="proxytune-supervise-ddp-"))  # every stage's data; the code stays in REPO
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["subject"]["images"] = str(work / params["subject"]["images"])  # bootstrap writes the photos there
    params["supervisor"].update(SUPERVISOR)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    os.environ["PROXYTUNE_CACHE"] = str(work / ".proxytune" / "cache")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    params = load_params(work / "params.yaml")
    paths = {stage: stage_paths(stage, work) for stage in ("bootstrap", "prepare", "supervise")}
    bootstrap.run(params, Log(), paths["bootstrap"])
    prepare.run(params, Log(), paths["prepare"])
    out, loss_csv = paths["supervise"]["out"], paths["supervise"]["loss_csv"]

    start = time.perf_counter()
    supervise.run(params, Log(), paths["supervise"])
    one_s = time.perf_counter() - start
    single, single_losses = lora(out), losses(loss_csv)
    shutil.rmtree(out)

    bin_dir = Path(sys.executable).parent
    # `--cpu` alone starts one process (several need MPI): torchrun's launcher, on the CPU, with gloo
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    flags = [arg for name, path in paths["supervise"].items() for arg in (f"--{name.replace('_', '-')}", str(path))]
    start = time.perf_counter()
    subprocess.run([str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                    "--num_cpu_threads_per_process", "1", "--num_machines", "1", "--mixed_precision", "no",
                    "--dynamo_backend", "no", "-m", "tasks.supervise", "--params", str(work / "params.yaml"), *flags],
                   cwd=REPO, env=env, check=True)
    two_s = time.perf_counter() - start
    launched = lora(out)
    two_losses = losses(loss_csv)
    if sorted(launched) != sorted(single):
        raise SystemExit("2-process LoRA has other tensors than the 1-process LoRA")
    diff = max((launched[k] - single[k]).abs().max().item() for k in single)
    scale = max(single[k].abs().max().item() for k in single)
    loss_diff = max(abs(a - b) for a, b in zip(single_losses, two_losses, strict=True))

    shutil.rmtree(out)
    log = Log()
    start = time.perf_counter()
    supervise.run(params, log, paths["supervise"])  # what `dvc repro` runs next: resumes at the last step, only publishes
    publish_s = time.perf_counter() - start
    republished = lora(out) == launched
    folder_left = checkpoint_dir("supervise", params, paths["supervise"]).exists()
    shutil.rmtree(work, ignore_errors=True)

    steps, batch = SUPERVISOR["steps"], SUPERVISOR["batch_size"]
    print(f"\nsupervise, tiny SD1.5, {steps} steps, global batch {batch} (+ prior batch {batch})")
    print(f"1 process {one_s:.2f} s   2 processes (accelerate, gloo, 2 per process) {two_s:.2f} s "
          "(process start-up included)")
    print(f"LoRA max |2 proc - 1 proc| = {diff:.3g} (largest weight {scale:.3g}), loss max diff {loss_diff:.3g}")
    print(f"stage after the launch: published the launch's LoRA (tensors and metadata): {republished}, "
          f"trained steps: {len(log.steps)}, {publish_s:.2f} s")
    if diff > TOLERANCE or loss_diff > TOLERANCE:
        raise SystemExit(f"2-process training differs from 1 process by {max(diff, loss_diff):.3g} > {TOLERANCE}")
    if not republished or log.steps or folder_left:
        raise SystemExit("the stage after the launch did not publish the launch's final checkpoint as it is")
    return {"steps": steps, "global_batch": batch, "one_process_s": one_s, "two_processes_s": two_s,
            "publish_after_launch_s": publish_s, "lora_max_abs_diff": diff, "lora_max_abs": scale,
            "loss_max_abs_diff": loss_diff, "republished_identical": republished}


def main() -> None:
    torch.set_num_threads(1)  # as each of the 2 processes: one thread
    results = {"stage": bench_stage(), "recipes": bench_recipes(), "load_average": os.getloadavg()}
    path = REPO / "bench" / "results" / "supervise_ddp.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Stage `synthesize`: the tuned supervisor renders proxy images of the subject in many contexts.

Proxy-Tuning's student learns from these instead of the few references, so they must vary in scene,
accessories and properties (`proxytune.prompts`). Proxies are rendered in batches; kernels round
differently with the batch size, so every manifest row records its seed *and* its batch and position,
and `regenerate` re-renders that same batch to get the identical pixels back.

Finished batches land in a work folder keyed by the stage's inputs (images written atomically, then one
small manifest file per batch), so an interrupted run resumes at the first unfinished batch. Several
processes can share the work: `accelerate launch -m tasks.synthesize` gives process r the batches
b with b % N == r (see docs/scale.md); the stage then publishes its `--out` folder in one rename.
"""
from __future__ import annotations

import json
import shutil
import sys
from itertools import groupby
from pathlib import Path

import torch
from PIL import Image

from orchestration.cache import checkpoint_dir
from orchestration.stage import launched_stage_args
from proxytune.diffusion import learned_token, load_pipeline, sample
from proxytune.io import atomic_dir, atomic_file, atomic_write_text, read_jsonl, sha256_file, write_jsonl
from proxytune.params import ProxytuneError, get, load_params, local_path, model_source
from proxytune.progress import Progress
from proxytune.prompts import proxy_prompts, subject_phrase, with_token


def settings(params: dict) -> dict:
    """The `synthesize` params (`proxytune.schema` checked them) under the names the plan uses."""
    s = params["synthesize"]
    return {"num_images": s["num_images"], "batch_size": s["batch_size"], "user_prompts": s["user_prompts"],
            "steps": s["sample_steps"], "guidance_scale": s["guidance_scale"], "scheduler": s["scheduler"],
            "min_dino": s["min_dino"]}


def plan(params: dict, token: str | None = None) -> list[list[dict]]:
    """Every proxy to render, grouped into batches: index, prompt (the student's caption), supervisor_prompt (the
    same with the identifier as the supervisor's learned `token`, if any), seed, batch, position, sampler settings."""
    cfg = settings(params)
    identifier = get(params, "subject.identifier")
    prompts = proxy_prompts(subject_phrase(identifier, get(params, "subject.class_noun")), cfg["num_images"],
                            cfg["user_prompts"])
    rows = [{"index": i, "prompt": p, "supervisor_prompt": with_token(p, identifier, token),
             "seed": int(params["seed"]) * 1_000_003 + i,
             "batch": i // cfg["batch_size"], "position": i % cfg["batch_size"],
             "steps": cfg["steps"], "guidance_scale": cfg["guidance_scale"],
             "resolution": int(get(params, "prepare.resolution"))} for i, p in enumerate(prompts)]
    return [list(batch) for _, batch in groupby(rows, key=lambda r: r["batch"])]


def load_supervisor(params: dict, lora_dir: Path, device: str | torch.device = "cpu"):
    """The DreamBooth-tuned supervisor (its LoRA in `lora_dir`) with the sampler `synthesize.scheduler` names
    (null: the family's default)."""
    return load_pipeline(model_source(params, "supervisor.model"), lora_dir=lora_dir,
                         scheduler=get(params, "synthesize.scheduler")).to(device)


def render_batch(pipe, rows: list[dict]) -> list[Image.Image]:
    """The whole batch in one pipeline call, one CPU generator per image (the same initial noise on any device),
    so each image is fixed by its seed and the batch it was rendered in."""
    first = rows[0]
    return sample(pipe, [r["supervisor_prompt"] for r in rows], [r["seed"] for r in rows], first["steps"],
                  first["guidance_scale"], first["resolution"], batch_size=len(rows), progress=None)


def regenerate(pipe, row: dict, rows: list[dict]) -> Image.Image:
    """`row`'s proxy again, pixel-exact: its batch is re-rendered with the same members in the same order.
    `rows` must hold the whole batch: the kept and the dropped rows (`proxy_rows`)."""
    if type(pipe.scheduler).__name__ != row["scheduler"]:
        raise ValueError(f"row was rendered with {row['scheduler']}, the pipeline samples with "
                         f"{type(pipe.scheduler).__name__}")
    batch = sorted((r for r in rows if r["batch"] == row["batch"]), key=lambda r: r["position"])
    return render_batch(pipe, batch)[row["position"]]


def proxy_rows(out: Path) -> list[dict]:
    """Every rendered proxy, kept and dropped, in rendering order."""
    return sorted(read_jsonl(out / "manifest.jsonl") + read_jsonl(out / "dropped.jsonl"), key=lambda r: r["index"])


def dino_scorer(params: dict, prepared: Path, device):
    """Mean DINO cosine similarity of each image to the prepared references (DreamBench's DINO, per image)."""
    from proxytune.metrics import DinoEmbedder

    dino = DinoEmbedder(local_path(params, "evaluate.dino", "DINO model folder"), device=str(device))
    refs = dino.embed_images([Image.open(prepared / r["file"]).convert("RGB")
                              for r in read_jsonl(prepared / "captions.jsonl")])
    return lambda images: [round(float(s), 6) for s in (dino.embed_images(images) @ refs.T).mean(dim=1)]


def batch_file(work: Path, batch: list[dict]) -> Path:
    return work / "batches" / f"{batch[0]['batch']:06d}.jsonl"


def finished(work: Path, batch: list[dict]) -> bool:
    """A batch counts as done only when its manifest file is there and every image still has its hash."""
    path = batch_file(work, batch)
    return path.is_file() and all((work / r["file"]).is_file() and sha256_file(work / r["file"]) == r["sha256"]
                                  for r in read_jsonl(path))


def render(params: dict, paths: dict[str, Path], rank: int = 0, world: int = 1,
           device: str | torch.device = "cpu") -> Path:
    """Render this process's share of the unfinished batches (b % world == rank) into the work folder."""
    cfg = settings(params)
    work = checkpoint_dir("synthesize", params, paths)
    todo = [b for b in plan(params, learned_token(paths["supervised"]))[rank::world] if not finished(work, b)]
    if not todo:
        return work
    pipe = load_supervisor(params, paths["supervised"], device)
    score = dino_scorer(params, paths["prepared"], device) if cfg["min_dino"] is not None else None
    (work / "images").mkdir(parents=True, exist_ok=True)
    with Progress("synthesize", sum(map(len, todo)), unit="image") as bar:
        for batch in todo:
            images = render_batch(pipe, batch)
            scores = score(images) if score else [None] * len(images)
            done = []
            for row, image, dino in zip(batch, images, scores, strict=True):
                rel = f"images/{row['index']:05d}.png"
                with atomic_file(work / rel) as tmp:
                    image.save(tmp, format="PNG")
                done.append({**row, "file": rel, "sha256": sha256_file(work / rel), "dino": dino,
                             "scheduler": type(pipe.scheduler).__name__})
            write_jsonl(batch_file(work, batch), done)
            bar.advance(len(batch))
    return work


def publish(params: dict, work: Path, out: Path, log) -> dict:
    """Filter by DINO and write `out` in one rename; the work folder goes once published."""
    cfg = settings(params)
    rows = [r for batch in plan(params) for r in read_jsonl(batch_file(work, batch))]
    threshold = cfg["min_dino"]
    kept, dropped = [], []
    for r in rows:
        if threshold is None or r["dino"] >= threshold:
            kept.append(r)
        else:
            dropped.append({k: v for k, v in r.items() if k != "file"})  # its image is not in the set
    if not kept:
        raise ProxytuneError(f"params: synthesize.min_dino {threshold} drops all {len(rows)} proxies "
                             f"(best DINO score {max(r['dino'] for r in rows)})")
    scored = [r["dino"] for r in kept if r["dino"] is not None]
    summary = {"rendered": len(rows), "kept": len(kept), "dropped": len(dropped), "min_dino": threshold,
               "mean_dino_kept": sum(scored) / len(scored) if scored else None}
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        for r in kept:
            shutil.copyfile(work / r["file"], tmp / r["file"])
        write_jsonl(tmp / "manifest.jsonl", kept)
        write_jsonl(tmp / "dropped.jsonl", dropped)
        atomic_write_text(tmp / "summary.json", json.dumps(summary, indent=2))
    shutil.rmtree(work)
    log.metrics({"num_proxies": len(kept), "num_dropped": len(dropped)})
    return {"images_dir": str(out / "images"), "manifest": str(out / "manifest.jsonl"),
            "summary": str(out / "summary.json")}


def run(params: dict, log, paths: dict[str, Path]) -> dict:
    """Write `paths["out"]`: kept proxies in `images/`, their rows (file, prompt, seed, batch, position,
    sha256, dino) in `manifest.jsonl`, the filtered-out rows in `dropped.jsonl`, counts in `summary.json`."""
    from accelerate import PartialState

    return publish(params, render(params, paths, device=PartialState().device), paths["out"], log)


def main(argv: list[str] | None = None) -> int:
    """Under `accelerate launch`: every process renders its share of the batches into the shared work folder.
    The stage (`dvc repro`, or `python -m flows.pipeline --stage synthesize`) then finds them done and publishes."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # `accelerate launch --cpu` sets this flag, which PartialState (unlike Accelerator) leaves to its caller
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    print(f"synthesize: process {state.process_index} of {state.num_processes} on {state.device}", flush=True)
    try:
        params_file, paths = launched_stage_args("synthesize", argv)
        render(load_params(params_file), paths, state.process_index, state.num_processes, state.device)
    except ProxytuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())

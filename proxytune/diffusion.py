"""Loading and sampling the diffusion supervisor through diffusers, shared by three stages."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from proxytune.params import ProxytuneError

SUPPORTED_PIPELINES = {"StableDiffusionPipeline"}


def load_pipeline(model: str, lora_dir: str | Path | None = None):
    """An SD-family pipeline from a local folder or hub id, with a fast multistep sampler.

    `lora_dir` holds `pytorch_lora_weights.safetensors`, loaded with the standard `load_lora_weights`.
    """
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    index = Path(model) / "model_index.json"
    if Path(model).exists():
        if not index.is_file():
            raise ProxytuneError(f"{model}: not a diffusers pipeline folder (no model_index.json)")
        family = json.loads(index.read_text()).get("_class_name")
        if family not in SUPPORTED_PIPELINES:
            raise ProxytuneError(
                f"{index}: pipeline {family!r} is not supported as supervisor (supported: {', '.join(sorted(SUPPORTED_PIPELINES))})"
            )
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    return pipe


@torch.inference_mode()
def sample(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float,
           batch_size: int, resolution: int | None = None) -> list[Image.Image]:
    """One image per (prompt, seed); each image has its own generator, so batching never changes it."""
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[chunk]]
        out = pipe(prompts[chunk], num_inference_steps=steps, guidance_scale=guidance,
                   generator=generators, height=resolution, width=resolution)
        images.extend(out.images)
    return images

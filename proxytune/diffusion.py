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
           resolution: int | None = None) -> list[Image.Image]:
    """One image per (prompt, seed), each from its own generator and its own pipeline call.

    Kernels round differently with the batch size (an image rendered in a batch of 8 and alone can differ
    by one level in a few pixels), so images are rendered one per call: each is a function of
    (prompt, seed) alone and any manifest row regenerates exactly.
    """
    images = []
    for prompt, seed in zip(prompts, seeds, strict=True):
        out = pipe([prompt], num_inference_steps=steps, guidance_scale=guidance,
                   generator=[torch.Generator("cpu").manual_seed(seed)], height=resolution, width=resolution)
        images.extend(out.images)
    return images

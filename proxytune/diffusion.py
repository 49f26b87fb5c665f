"""Loading and sampling the diffusion supervisor through diffusers, shared by three stages.

A supervisor is any diffusers pipeline folder or hub id of the four families Proxy-Tuning used; the family
is read from `model_index.json`'s `_class_name`: SD1.5/SD2 and SDXL (UNet, epsilon or v-prediction, as the
scheduler config says) and SD3/SD3.5 and FLUX.1 (transformer, flow matching).
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from PIL import Image

from proxytune.params import ProxytuneError
from proxytune.progress import Progress

FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
FLOW_FAMILIES = {"sd3", "flux"}
# Sampler names users write in params -> diffusers scheduler classes, built from the pipeline's own config.
SCHEDULERS = {
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "flow-euler": "FlowMatchEulerDiscreteScheduler",
}
DEFAULT_SCHEDULER = {"sd": "dpm++", "sdxl": "dpm++", "sd3": "flow-euler", "flux": "flow-euler"}
TEXTUAL_INVERSION_FILE = "embeddings.safetensors"


def pipeline_index(model: str) -> dict:
    """The pipeline's `model_index.json` (for a hub id, only that file is fetched)."""
    index = Path(model) / "model_index.json"
    if Path(model).exists():
        if not index.is_file():
            raise ProxytuneError(f"{model}: not a diffusers pipeline folder (no model_index.json)")
        return json.loads(index.read_text())
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(model)


def family_of(index: dict, where: str = "model_index.json") -> str:
    name = index.get("_class_name")
    if name not in FAMILIES:
        raise ProxytuneError(
            f"{where}: pipeline {name!r} is not supported as supervisor (supported: {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[name]


def make_scheduler(family: str, config, name: str | None = None):
    """The sampler `name` (None: the family's default) configured from the pipeline's scheduler config."""
    import diffusers

    name = name or DEFAULT_SCHEDULER[family]
    if (name == "flow-euler") != (family in FLOW_FAMILIES):
        fits = [n for n in SCHEDULERS if (n == "flow-euler") == (family in FLOW_FAMILIES)]
        raise ProxytuneError(f"params: scheduler {name!r} does not fit a {family} model (use one of: {', '.join(fits)})")
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


def load_pipeline(model: str, lora_dir: str | Path | None = None, scheduler: str | None = None,
                  torch_dtype: torch.dtype | None = None):
    """A supervisor pipeline from a local folder or hub id, with the sampler `scheduler` (see SCHEDULERS).

    `lora_dir` holds `pytorch_lora_weights.safetensors`, loaded with the standard `load_lora_weights`, and,
    after pivotal tuning, `embeddings.safetensors` (new token embeddings per CLIP encoder).
    """
    import diffusers

    index = pipeline_index(model)
    family = family_of(index, f"{model}/model_index.json")
    # Components saved as None (no T5 in an SD3 folder, no safety checker) must be passed as None again.
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v and v[0] is None}
    if family == "sd":
        absent.update(safety_checker=None, requires_safety_checker=False)
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(model, torch_dtype=torch_dtype, **absent)
    pipe.scheduler = make_scheduler(family, pipe.scheduler.config, scheduler)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
        load_token_embeddings(pipe, Path(lora_dir) / TEXTUAL_INVERSION_FILE)
    return pipe


def load_token_embeddings(pipe, path: Path) -> None:
    """Register pivotal-tuning tokens (file written by `proxytune.dreambooth`) with every CLIP encoder."""
    if not path.is_file():
        return
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        tokens = json.loads(f.metadata()["tokens"])
        for key, (encoder, tokenizer) in {"clip_l": ("text_encoder", "tokenizer"),
                                          "clip_g": ("text_encoder_2", "tokenizer_2")}.items():
            if key in f.keys():
                pipe.load_textual_inversion(f.get_tensor(key), token=tokens, text_encoder=getattr(pipe, encoder),
                                            tokenizer=getattr(pipe, tokenizer))


def learned_token(lora_dir: str | Path | None) -> str | None:
    """The token a prompt names the subject by after pivotal tuning (`<sks>`, which expands to all the learned
    vectors once loaded), or None when `lora_dir` holds no learned tokens."""
    if lora_dir is None or not (path := Path(lora_dir) / TEXTUAL_INVERSION_FILE).is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["tokens"])[0]


def family_call_kwargs(pipe) -> dict:
    """Per-family call arguments: FLUX's T5 prompt length follows its tokenizer (512 for FLUX.1)."""
    if type(pipe).__name__ == "FluxPipeline":
        return {"max_sequence_length": min(512, pipe.tokenizer_2.model_max_length)}
    return {}


@torch.inference_mode()
def sample(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float,
           resolution: int | None = None, batch_size: int = 1, progress: str | None = "sampling") -> list[Image.Image]:
    """One image per (prompt, seed), each from its own generator, `batch_size` images per pipeline call.

    Kernels round differently with the batch size (an image rendered in a batch of 8 and alone can differ
    by one level in a few pixels), so an image is a function of (prompt, seed, batch_size); the default of
    one per call makes any manifest row regenerate exactly on its own. `progress` names the loop in the
    progress reports (None: the caller reports, as a loop over batches does).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    images = []
    with Progress(progress, len(prompts), unit="image") if progress else nullcontext() as bar:
        for i in range(0, len(prompts), batch_size):
            out = pipe(prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                       height=resolution, width=resolution, generator=[torch.Generator("cpu").manual_seed(s)
                                                                       for s in seeds[i:i + batch_size]],
                       **family_call_kwargs(pipe))
            images.extend(out.images)
            if bar is not None:
                bar.advance(len(out.images))
    return images

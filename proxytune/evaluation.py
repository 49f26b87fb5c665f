"""Drawing and scoring for evaluation: the tuned student's and the DreamBooth supervisor's samples, and the
DreamBench evaluators. The evaluate stage and the claims runner share them."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from proxytune import metrics
from proxytune.diffusion import learned_token, load_pipeline, sample
from proxytune.images import to_pil
from proxytune.io import cache_dir
from proxytune.params import ProxytuneError, get, local_path, model_source
from proxytune.prompts import with_token
from proxytune.tuning import load_tuned


def student_samples(params: dict, prompts: list[str], distilled: Path) -> list[Image.Image]:
    """The tuned student (base weights + the artifacts in `distilled`, whatever the method) draws `prompts`."""
    tuned = load_tuned(distilled, params["student"])
    return to_pil(tuned.generate(prompts, **student_sampling(params)))


def student_sampling(params: dict) -> dict:
    """The `generate` settings every evaluated student draws with (`evaluate.*` and the run's seed)."""
    e = params["evaluate"]
    return {"cfg_scale": float(e["cfg_scale"]), "temperature": float(e["temperature"]), "top_k": int(e["top_k"]),
            "top_p": float(e["top_p"]), "seed": int(params["seed"])}


def supervisor_samples(params: dict, prompts: list[str], lora_dir: Path | None) -> list[Image.Image]:
    """The DreamBooth supervisor (its LoRA in `lora_dir`; None: the base model) draws `prompts`, one seed per
    prompt; after pivotal tuning the identifier in them is read as the learned tokens."""
    pipe = load_pipeline(model_source(params, "supervisor.model"), lora_dir=lora_dir)
    token, identifier = learned_token(lora_dir), get(params, "subject.identifier")
    seeds = [int(params["seed"]) * 7919 + i for i in range(len(prompts))]
    return sample(pipe, [with_token(p, identifier, token) for p in prompts], seeds,
                  int(get(params, "supervisor.sample_steps")), float(get(params, "supervisor.guidance_scale")),
                  resolution=int(get(params, "prepare.resolution")), progress="supervisor samples")


def load_evaluators(params: dict, notes: list[str]) -> tuple[metrics.EmbeddingCache, metrics.DinoEmbedder,
                                                             metrics.ClipEmbedder, metrics.LpipsDistance | None]:
    """DINO and CLIP (required) and LPIPS (optional: DIV is skipped, with a line in `notes`, when it cannot
    load, since its backbone weights are often unavailable offline)."""
    e = params["evaluate"]
    cache = metrics.EmbeddingCache(cache_dir("embeddings"))
    dino = metrics.DinoEmbedder(local_path(params, "evaluate.dino", "DINO model folder"), cache=cache)
    try:
        clip = metrics.ClipEmbedder(e["clip_model"], e["clip_pretrained"], config_dir=e.get("clip_config_dir") or None,
                                    cache=cache, force_quick_gelu=bool(e["clip_quick_gelu"]))
    except (FileNotFoundError, RuntimeError) as err:
        raise ProxytuneError(f"params: evaluate.clip_model / clip_pretrained / clip_config_dir: {err}") from None
    lpips = None
    if not e["lpips_backbone"]:
        notes.append("DIV skipped: evaluate.lpips_backbone is empty (LPIPS needs a local backbone checkpoint)")
    else:
        try:
            lpips = metrics.LpipsDistance(e["lpips_backbone"], net=e["lpips_net"])
        except ImportError:
            notes.append("DIV skipped: the lpips package is not installed")
        except FileNotFoundError as err:
            notes.append(f"DIV skipped: evaluate.lpips_backbone: {err}")
        except ValueError as err:
            raise ProxytuneError(f"params: evaluate.lpips_backbone: {err}") from None
    return cache, dino, clip, lpips

"""Random-init tiny DINO and CLIP evaluators in the real on-disk formats (transformers ViT, open_clip), so the
metrics' real loaders run offline; the world's pretrained evaluators start from the same architectures."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from proxytune.io import atomic_dir
from proxytune.metrics import IMAGENET_MEAN, IMAGENET_STD

TINY_CLIP_NAME = "proxytune-tiny-clip"


def tiny_clip_config(image_size: int) -> dict:
    """open_clip model-config JSON (the ViT-B-32 layout, shrunk)."""
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": 64, "patch_size": image_size // 4},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


def build_tiny_evaluators(out_dir: str | os.PathLike, seed: int = 0, image_size: int = 64) -> dict:
    """Write random-init tiny DINO and CLIP models in the real on-disk formats.

    Why: real checkpoints cannot be downloaded here, but tests and dry runs must exercise
    the real loaders. Output (deterministic for a seed; the global RNG is left untouched):
      out_dir/dino/  ViTModel folder (ViT-S/16 family, tiny) + ViTImageProcessor config
      out_dir/clip/  <TINY_CLIP_NAME>.json (open_clip config) + open_clip_model.safetensors
    Built in a temp folder and renamed into place; refuses a non-empty `out_dir`.
    Returns {"dino", "clip_config_dir", "clip_pretrained", "clip_model_name"} (str values),
    i.e. DinoEmbedder(r["dino"]) and
    ClipEmbedder(r["clip_model_name"], r["clip_pretrained"], config_dir=r["clip_config_dir"]).
    """
    import open_clip
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"refusing to overwrite non-empty path: {out}")
    with atomic_dir(out) as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit_config = ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                               intermediate_size=192, image_size=image_size, patch_size=image_size // 4)
        ViTModel(vit_config, add_pooling_layer=False).save_pretrained(tmp / "dino")
        ViTImageProcessor(size={"height": image_size, "width": image_size},
                          image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
                          ).save_pretrained(tmp / "dino")

        torch.manual_seed(seed)
        clip_config = tiny_clip_config(image_size)
        (tmp / "clip").mkdir()
        (tmp / "clip" / f"{TINY_CLIP_NAME}.json").write_text(json.dumps(clip_config, indent=2))
        state = open_clip.CLIP(**clip_config).state_dict()  # what create_model builds for it
        save_file({k: v.contiguous() for k, v in state.items()},
                  tmp / "clip" / "open_clip_model.safetensors")
    return {
        "dino": str(out / "dino"),
        "clip_config_dir": str(out / "clip"),
        "clip_pretrained": str(out / "clip" / "open_clip_model.safetensors"),
        "clip_model_name": TINY_CLIP_NAME,
    }

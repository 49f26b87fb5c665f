"""Conversions between PIL images and the [-1, 1] tensors every model in the pipeline works in."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> float tensor (B, 3, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Tensor (B, 3, H, W) in [-1, 1] -> PIL images, rounded to the nearest 8-bit level."""
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def load_rgb(path) -> Image.Image:
    """The image at `path` as RGB, decoded in full now: PIL decodes lazily, so a truncated file fails here,
    inside a caller's check, not later in the middle of a batch."""
    with Image.open(path) as img:
        return img.convert("RGB")

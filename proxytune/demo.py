"""The embedded demo subject: four deterministic photos of one toy, drawn by code.

They deliberately differ in size and aspect, and one carries an EXIF orientation tag, so the demo
exercises the same normalisation real phone photos need.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

from proxytune.io import atomic_dir

CLASS_NOUN = "toy"
_SIZES = [(96, 96), (128, 96), (96, 120), (112, 112)]
_BACKGROUNDS = [(200, 220, 240), (235, 225, 200), (210, 240, 210), (240, 210, 225)]


def _draw_toy(size: tuple[int, int], background, rng: random.Random) -> Image.Image:
    """A yellow ball with a red band and a blue star: one specific instance of 'toy'."""
    w, h = size
    img = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(img)
    for _ in range(6):  # soft clutter so references are not identical backgrounds
        x, y = rng.randrange(w), rng.randrange(h)
        shade = tuple(max(0, c - rng.randrange(20, 50)) for c in background)
        draw.ellipse([x, y, x + rng.randrange(6, 16), y + rng.randrange(6, 16)], fill=shade)
    r = int(min(w, h) * rng.uniform(0.28, 0.34))
    cx, cy = w // 2 + rng.randrange(-6, 7), h // 2 + rng.randrange(-6, 7)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(250, 210, 40), outline=(90, 60, 10), width=2)
    draw.rectangle([cx - r + 3, cy - r // 4, cx + r - 3, cy + r // 4], fill=(210, 40, 40))
    turn = rng.uniform(0, math.pi)
    star = [
        (cx + (r * 0.45 if i % 2 == 0 else r * 0.18) * math.cos(turn + i * math.pi / 5),
         cy + (r * 0.45 if i % 2 == 0 else r * 0.18) * math.sin(turn + i * math.pi / 5))
        for i in range(10)
    ]
    draw.polygon(star, fill=(30, 60, 200))
    return img


def write_demo_subject(out_dir: str | Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for i, (size, bg) in enumerate(zip(_SIZES, _BACKGROUNDS)):
            img = _draw_toy(size, bg, rng)
            exif = Image.Exif()
            if i == 3:  # stored rotated, as a phone would; prepare must undo it
                img = img.transpose(Image.Transpose.ROTATE_90)
                exif[0x0112] = 6
            img.save(tmp / f"{i:02d}.jpg", quality=95, exif=exif)
    return out_dir

"""The embedded demo subject: four photos of the miniature world's subject 0 (`world.make_subject(0)`), the
instance the world-pretrained models have never seen, so `make demo` personalises something new to them.

They are rendered at different sizes and one is stored rotated with an EXIF orientation tag, so the demo
exercises the same normalisation real phone photos need.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from proxytune.io import atomic_dir
from testbed import world

SUBJECT = world.make_subject(0)
CLASS_NOUN = SUBJECT.class_noun
_SIZES = [96, 128, 112, 96]


def write_demo_subject(out_dir: str | Path, seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for i, (size, image_seed) in enumerate(zip(_SIZES, world.reference_seeds(len(_SIZES), seed))):
            img = world.render(world.reference_spec(SUBJECT), image_seed, size)
            exif = Image.Exif()
            if i == 3:  # stored rotated, as a phone would; prepare must undo it
                img = img.transpose(Image.Transpose.ROTATE_90)
                exif[0x0112] = 6
            img.save(tmp / f"{i:02d}.jpg", quality=95, exif=exif)
    return out_dir

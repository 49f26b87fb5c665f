"""Stage `prepare`: validate and normalise the subject's reference photos.

Phone photos arrive rotated by EXIF, in odd modes (RGBA, CMYK, palette) and sizes; the supervisor and
the student both want square RGB images at the model resolution, captioned with the identifier.
"""
from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from proxytune.io import atomic_dir, sha256_bytes, sha256_file, write_jsonl
from proxytune.params import ProxytuneError, get, local_path
from proxytune.prompts import subject_phrase

MIN_IMAGES = 2


def load_reference(path: Path, min_side: int) -> Image.Image:
    """Open one photo fully (so truncation is caught now), upright and RGB, or fail naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()
    except UnidentifiedImageError:
        raise ProxytuneError(f"{path}: not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ProxytuneError(f"{path}: unreadable or truncated image ({e})") from None
    img = ImageOps.exif_transpose(img)
    if min(img.size) < min_side:
        raise ProxytuneError(
            f"{path}: image is {img.width}x{img.height} px; the shorter side must be at least {min_side} px"
        )
    img = eight_bit(img)
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def eight_bit(img: Image.Image) -> Image.Image:
    """16-bit and float greyscale as 8-bit greyscale, scaled by their range: PIL's own conversion clips them,
    so a 16-bit photo comes out white. Other modes are returned as they are."""
    if not (img.mode in ("I", "F") or img.mode.startswith("I;16")):
        return img
    values = np.nan_to_num(np.asarray(img, dtype=np.float64))
    low, high = values.min(), values.max()
    if img.mode.startswith("I;16") or (img.mode == "I" and low >= 0 and 255 < high <= 65535):
        values = values / 257  # the 16-bit range
    elif img.mode == "F" and low >= 0 and high <= 1:
        values = values * 255  # float images mostly hold 0..1
    elif low < 0 or high > 255:
        values = (values - low) / max(high - low, 1e-12) * 255  # no known range: stretch what is there
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def warn_identical(images: list[tuple[Path, Image.Image]]) -> None:
    """Identical photos teach nothing new (and weigh that view twice): say which, but go on."""
    groups = defaultdict(list)
    for path, img in images:
        groups[sha256_bytes(img.tobytes() + repr(img.size).encode())].append(path.name)
    for names in groups.values():
        if len(names) > 1:
            logging.getLogger(__name__).warning(
                "subject.images: %s are identical photos (DreamBooth learns from different views)", ", ".join(names))


def square(img: Image.Image, resolution: int) -> Image.Image:
    return ImageOps.fit(img, (resolution, resolution), method=Image.Resampling.LANCZOS)


def reference_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if len(files) < MIN_IMAGES:
        raise ProxytuneError(
            f"{folder}: found {len(files)} reference image(s); DreamBooth needs at least {MIN_IMAGES} (3-5 is typical)"
        )
    return files


def run(params: dict, log, paths: dict[str, Path]) -> dict:
    """Write `instance/*.png` and `captions.jsonl` (`subject.caption` of "[V] <class>") into `paths["out"]`."""
    folder = local_path(params, "subject.images", "folder")
    if not folder.is_dir():
        raise ProxytuneError(f"params: subject.images: {str(folder)!r} is not a folder")
    resolution = get(params, "prepare.resolution")
    caption = get(params, "subject.caption").format(
        subject_phrase(get(params, "subject.identifier"), get(params, "subject.class_noun")))
    images = [(p, load_reference(p, max(8, resolution // 2))) for p in reference_files(folder)]
    warn_identical(images)
    out = paths["out"]
    with atomic_dir(out) as tmp:
        (tmp / "instance").mkdir()
        rows = []
        for i, (src, img) in enumerate(images):
            rel = f"instance/{i:02d}.png"
            square(img, resolution).save(tmp / rel)
            rows.append({"file": rel, "caption": caption, "source": src.name,
                         "sha256": sha256_file(tmp / rel)})
        write_jsonl(tmp / "captions.jsonl", rows)
    log.metrics({"num_references": len(rows)})
    return {"instance_dir": str(out / "instance"), "captions": str(out / "captions.jsonl")}


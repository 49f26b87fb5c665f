"""A miniature world: a deterministic generator of small captioned images.

Objects of a few classes (distinct silhouettes) with a colour, a pattern and its accent colour, on backgrounds
standing in for DreamBench's re-contextualisation prompts, with its accessories and property changes. Every
scene, accessory and property is named by the phrase `proxytune.prompts` uses, so the proxy bank and the
evaluation prompts map onto the world (`apply_template`). An image is a pure function of (spec, seed): drawn
with PIL at `SS`x the size and box-downsampled, so edges are anti-aliased and the bytes reproducible. A
*subject* is an instance whose (class, colour, pattern) the pretraining distribution never shows.
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from proxytune.io import atomic_dir
from proxytune.prompts import ACCESSORIES, PROPERTIES, RECONTEXT

SS = 4  # supersampling factor: shapes are drawn at SS x size, then box-averaged down
CLASSES = ("ball", "box", "cup", "can", "toy")
COLOURS = {
    "red": (210, 40, 40), "orange": (240, 130, 30), "yellow": (240, 210, 40), "green": (50, 160, 60),
    "blue": (40, 80, 200), "purple": (130, 50, 170), "pink": (240, 130, 180), "white": (245, 245, 245),
    "black": (30, 30, 30), "brown": (120, 75, 40),
}
PATTERNS = ("plain", "striped", "dotted", "checked")
COLOUR_PROPERTIES = ("red", "purple")  # properties that repaint the object; the others change how it is drawn
# Reserved instances, one per subject: pretraining never shows these (class, colour, pattern), in any accent,
# scene or property, so personalising one is learning something new.
SUBJECT_COMBOS = (
    ("toy", "pink", "checked"), ("ball", "yellow", "dotted"), ("cup", "blue", "striped"),
    ("can", "green", "striped"), ("box", "orange", "dotted"), ("toy", "brown", "dotted"),
    ("ball", "purple", "checked"), ("cup", "red", "dotted"),
)
RAINBOW = [(220, 40, 40), (245, 140, 30), (245, 220, 40), (60, 170, 60), (40, 90, 210), (140, 60, 180)]


def _phrase(template: str) -> str:
    """'a {} on the beach' -> 'on the beach'; 'a red {}' -> 'red'."""
    if template.startswith("a {} "):
        return template[len("a {} "):]
    if template.startswith("a ") and template.endswith(" {}"):
        return template[2:-3]
    raise ValueError(f"prompt template {template!r}: expected 'a {{}} <context>' or 'a <property> {{}}'")


# The bank's accessories and properties, plus the ones only EVAL_PROMPTS ask for.
ACCESSORY_NAMES = tuple(_phrase(t) for t in ACCESSORIES) + ("in a purple wizard outfit",)
PROPERTY_NAMES = tuple(_phrase(t) for t in PROPERTIES) + ("wet",)


# ------------------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class Spec:
    """What one image shows; `None` scene is the neutral studio backdrop of the reference photos."""

    class_noun: str
    colour: str
    pattern: str = "plain"
    accent: str | None = None  # the pattern's second colour; None when plain
    scene: str | None = None  # a SCENES phrase, e.g. "on the beach"
    accessory: str | None = None  # an ACCESSORY_NAMES phrase, e.g. "wearing a red hat"
    property: str | None = None  # one of PROPERTY_NAMES, e.g. "shiny"

    def __post_init__(self):
        rules = [
            (self.class_noun in CLASSES, f"class_noun {self.class_noun!r} is not one of {CLASSES}"),
            (self.colour in COLOURS, f"colour {self.colour!r} is not one of {tuple(COLOURS)}"),
            (self.pattern in PATTERNS, f"pattern {self.pattern!r} is not one of {PATTERNS}"),
            ((self.accent is None) == (self.pattern == "plain"), "accent is needed by, and only by, a pattern"),
            (self.accent in (None, *COLOURS) and self.accent != self.colour,
             f"accent {self.accent!r} must be a colour other than {self.colour!r}"),
            (self.scene is None or self.scene in SCENES, f"scene {self.scene!r} is not a world scene"),
            (self.accessory is None or self.accessory in ACCESSORY_NAMES,
             f"accessory {self.accessory!r} is not a world accessory"),
            (self.property is None or self.property in PROPERTY_NAMES,
             f"property {self.property!r} is not one of {PROPERTY_NAMES}"),
        ]
        for ok, rule in rules:
            if not ok:
                raise ValueError(f"world Spec: {rule}")

    def look(self) -> tuple[str, str | None]:
        """(colour, accent) as drawn: a colour property repaints the body (and the accent, if it clashed)."""
        if self.property not in COLOUR_PROPERTIES:
            return self.colour, self.accent
        return self.property, (self.colour if self.accent == self.property else self.accent)

    def combo(self) -> tuple[str, str, str]:
        """The instance as seen: what subjects reserve and pretraining must never show."""
        return self.class_noun, self.look()[0], self.pattern

    def phrase(self) -> str:
        """'red ball', 'yellow and blue dotted ball'."""
        colour, accent = self.look()
        words = [colour] if self.pattern == "plain" else [f"{colour} and {accent}", self.pattern]
        return " ".join([*words, self.class_noun])


def caption(spec: Spec, identifier: str | None = None) -> str:
    """'a red and white striped ball wearing a red hat on the beach'; with an identifier the instance is
    named by it ('a shiny sks ball on the beach'), as the prompt bank's templates would write it."""
    if identifier:
        prop, phrase = spec.property, f"{identifier} {spec.class_noun}"
    else:
        prop = None if spec.property in COLOUR_PROPERTIES else spec.property  # already in the colour word
        phrase = spec.phrase()
    return " ".join(w for w in ("a", prop, phrase, spec.accessory, spec.scene) if w)


def apply_template(spec: Spec, template: str) -> Spec:
    """The world image a prompt template asks for: 'a {} on the beach' sets the scene of `spec`, and so on."""
    what = _phrase(template)
    if template.endswith("{}"):
        if what not in PROPERTY_NAMES:
            raise ValueError(f"prompt template {template!r}: property {what!r} is not one of {PROPERTY_NAMES}")
        return replace(spec, property=what)
    if what in SCENES:
        return replace(spec, scene=what)
    if what in ACCESSORY_NAMES:
        return replace(spec, accessory=what)
    raise ValueError(f"prompt template {template!r}: {what!r} is neither a world scene nor an accessory")


def _digest(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _rng(seed: int, *parts) -> np.random.Generator:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"world seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng([int(seed), _digest(*parts)])


# ------------------------------------------------------------------------------------------------- objects


class _Pen:
    """Draws a silhouette in unit coordinates into a mask, a per-face shade map and an ink (black) layer."""

    def __init__(self, side: int):
        self.side = side
        self.mask, self.shade, self.ink = (Image.new("L", (side, side)) for _ in range(3))

    def _xy(self, coords) -> list[float]:
        return (np.asarray(coords, np.float64).ravel() * self.side).tolist()

    def draw(self, kind: str, coords, shade: float = 1.0, width: float = 0.0):
        """kind: an ImageDraw method (polygon, ellipse, rectangle); width > 0 draws an outline that wide."""
        for img, value in ((self.mask, 255), (self.shade, min(255, round(shade * 200)))):
            getattr(ImageDraw.Draw(img), kind)(
                self._xy(coords), **({"outline": value, "width": max(1, round(width * self.side))} if width
                                     else {"fill": value}))

    def dot(self, x: float, y: float, r: float):
        ImageDraw.Draw(self.ink).ellipse(self._xy((x - r, y - r, x + r, y + r)), fill=255)


def _ball(pen):
    pen.draw("ellipse", (0.05, 0.05, 0.95, 0.95))


def _box(pen):
    pen.draw("rectangle", (0.05, 0.32, 0.95, 0.95))
    pen.draw("rectangle", (0.0, 0.22, 1.0, 0.38), shade=1.2)  # the lid


def _cup(pen):
    pen.draw("ellipse", (0.58, 0.3, 0.95, 0.7), width=0.08)  # handle
    pen.draw("polygon", [(0.08, 0.15), (0.72, 0.15), (0.63, 0.92), (0.17, 0.92)])
    pen.draw("ellipse", (0.08, 0.09, 0.72, 0.21), shade=0.6)  # the dark inside of the rim


def _can(pen):
    pen.draw("rectangle", (0.25, 0.12, 0.75, 0.9))
    pen.draw("ellipse", (0.25, 0.84, 0.75, 0.96))
    pen.draw("ellipse", (0.25, 0.05, 0.75, 0.19), shade=1.25)  # the lid


def _toy(pen):
    """A teddy: ears, head, body, arms, legs and two ink eyes."""
    for box in [(0.24, 0.02, 0.42, 0.2), (0.58, 0.02, 0.76, 0.2), (0.08, 0.42, 0.32, 0.62), (0.68, 0.42, 0.92, 0.62),
                (0.26, 0.78, 0.47, 0.98), (0.53, 0.78, 0.74, 0.98), (0.25, 0.38, 0.75, 0.86)]:
        pen.draw("ellipse", box)
    pen.draw("ellipse", (0.3, 0.05, 0.7, 0.42), shade=1.1)
    pen.dot(0.42, 0.21, 0.035)
    pen.dot(0.58, 0.21, 0.035)


def _cube(pen):
    pen.draw("polygon", [(0.05, 0.3), (0.3, 0.05), (0.95, 0.05), (0.7, 0.3)], shade=1.25)
    pen.draw("polygon", [(0.7, 0.3), (0.95, 0.05), (0.95, 0.7), (0.7, 0.95)], shade=0.7)
    pen.draw("rectangle", (0.05, 0.3, 0.7, 0.95))


SHAPES = {"ball": _ball, "box": _box, "cup": _cup, "can": _can, "toy": _toy}
# Where, as a fraction of the object's height from its top, eyes (glasses) and a neck (scarf, cape) sit.
FACE_Y = {"ball": 0.4, "box": 0.55, "cup": 0.45, "can": 0.4, "toy": 0.21, "cube": 0.55}
NECK_Y = {"ball": 0.62, "box": 0.6, "cup": 0.6, "can": 0.55, "toy": 0.42, "cube": 0.6}


def _pattern(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the accent colour goes, in the object's own unit frame, so a pattern scales and turns with it."""
    if pattern == "striped":
        return (v / 0.2) % 1 < 0.5
    if pattern == "dotted":
        row = np.floor(v / 0.25)
        du = (u + 0.125 * (row % 2)) % 0.25 - 0.125
        dv = v % 0.25 - 0.125
        return du**2 + dv**2 < 0.065**2
    if pattern == "checked":
        return (np.floor(u / 0.2) + np.floor(v / 0.2)) % 2 == 1
    return np.zeros_like(u, dtype=bool)


def _object(spec: Spec, side: int, rng: np.random.Generator, shape: str | None = None) -> Image.Image:
    """The object alone, an RGBA image `side` px square: pattern, lighting, outline and property effects."""
    pen = _Pen(side)
    shape = shape or ("cube" if spec.property == "cube shaped" else spec.class_noun)
    (_cube if shape == "cube" else SHAPES[shape])(pen)
    mask = np.asarray(pen.mask, np.float32) / 255
    v, u = (np.mgrid[0:side, 0:side].astype(np.float32) + 0.5) / side
    colour, accent = spec.look()
    jitter = rng.uniform(-10, 10, 3)
    base = np.clip(np.array(COLOURS[colour]) + jitter, 0, 255)
    rgb = np.where(_pattern(spec.pattern, u, v)[..., None],
                   np.clip(np.array(COLOURS[accent or colour]) + jitter, 0, 255), base).astype(np.float32)
    light = 1.2 - 0.7 * np.hypot(u - 0.38, v - 0.35) if shape == "ball" else 1.12 - 0.25 * (u + v)
    rgb *= (np.asarray(pen.shade, np.float32) / 200 * light)[..., None]
    if spec.property == "shiny":
        grey = rgb.mean(-1, keepdims=True)
        rgb = grey + 1.4 * (rgb - grey)
        glint = np.exp(-((u - 0.32) ** 2 + (v - 0.3) ** 2) / 0.01) + 0.6 * np.exp(-((u - v) ** 2) / 0.002)
        rgb += (255 - rgb) * np.minimum(glint, 0.95)[..., None]  # a specular spot and a streak
    elif spec.property == "wet":
        rgb = rgb * 0.72 + np.array([0, 12, 35])
        drops = np.zeros_like(mask, dtype=bool)
        for x, y in rng.uniform(0.15, 0.85, (7, 2)):
            drops |= (u - x) ** 2 + (v - y) ** 2 < 0.035**2
        rgb = np.where(drops[..., None], np.array([200, 225, 250]), rgb)
    eroded = np.asarray(pen.mask.filter(ImageFilter.MinFilter(2 * SS - 1)), np.float32) / 255
    rgb *= (1 - 0.55 * (mask - eroded))[..., None]  # a dark outline about one output pixel wide
    rgb *= (1 - np.asarray(pen.ink, np.float32)[..., None] / 255)
    alpha = (mask * 255).round().astype(np.uint8)
    return Image.fromarray(np.dstack([np.clip(rgb, 0, 255).round().astype(np.uint8), alpha]), "RGBA")


# ------------------------------------------------------------------------------------------------- scenes


class _Canvas:
    """A background being drawn: numpy for gradients and textures, ImageDraw for shapes, fractions for coords."""

    def __init__(self, side: int, rng: np.random.Generator):
        self.side, self.rng = side, rng
        self.img = Image.new("RGB", (side, side))
        self.pen = ImageDraw.Draw(self.img)

    def band(self, y0: float, y1: float, top, bottom=None):
        """Fill rows y0..y1 (fractions) with a vertical gradient from `top` to `bottom`."""
        a, b = round(y0 * self.side), round(y1 * self.side)
        if b <= a:
            return
        t = np.linspace(0, 1, b - a)[:, None, None]
        rows = np.array(top) * (1 - t) + np.array(bottom or top) * t
        strip = np.broadcast_to(rows, (b - a, self.side, 3)).round().astype(np.uint8)
        self.img.paste(Image.fromarray(np.ascontiguousarray(strip), "RGB"), (0, a))

    def shape(self, kind: str, coords, colour, width: float = 0.0):
        """kind: an ImageDraw method; a line takes `width`, other shapes are filled."""
        xy = (np.asarray(coords, np.float64).ravel() * self.side).tolist()
        extra = {"width": max(1, round(width * self.side))} if kind == "line" else {}
        getattr(self.pen, kind)(xy, fill=tuple(colour), **extra)

    def vary(self, colour, spread: float) -> tuple[int, ...]:
        return tuple(int(c) for c in np.clip(np.array(colour) + self.rng.uniform(-spread, spread), 0, 255))

    def horizon(self, y: float) -> float:
        return y + self.rng.uniform(-0.03, 0.03)


def _neutral(c):
    c.band(0, 1, (218, 216, 212), (182, 180, 176))


def _beach(c):
    h = c.horizon(0.32)
    c.band(0, h, (130, 195, 240), (185, 222, 245))
    c.band(h, h + 0.16, (30, 115, 180), (45, 140, 195))
    c.band(h + 0.16, 1, (238, 218, 165), (220, 195, 140))
    c.shape("line", (0, h + 0.16, 1, h + 0.16), (245, 250, 250), width=0.015)


def _jungle(c):
    c.band(0, 1, (25, 75, 35), (35, 60, 25))
    for _ in range(45):
        x, y, r = c.rng.uniform(0, 1), c.rng.uniform(0, 0.8), c.rng.uniform(0.05, 0.14)
        c.shape("ellipse", (x - r, y - r / 2, x + r, y + r / 2), c.vary((55, 140, 50), 30))
    c.band(0.82, 1, (55, 65, 25), (40, 45, 20))


def _snow(c):
    h = c.horizon(0.45)
    c.band(0, h, (200, 215, 232), (222, 232, 242))
    c.band(h, 1, (246, 247, 252), (236, 240, 250))
    for x, y in c.rng.uniform(0, 1, (30, 2)) * (1, h):
        c.shape("ellipse", (x - 0.008, y - 0.008, x + 0.008, y + 0.008), (255, 255, 255))


def _cobblestone(c):
    h = c.horizon(0.35)
    c.band(0, h, (170, 150, 130), (150, 135, 120))
    c.band(h, 1, (70, 68, 66))
    for row, y in enumerate(np.arange(h, 1, 0.06)):
        for x in np.arange(-0.04 * (row % 2), 1, 0.08):
            c.shape("ellipse", (x + 0.004, y + 0.004, x + 0.076, y + 0.056), c.vary((135, 130, 125), 18))


def _city(c):
    c.band(0, 1, (150, 190, 230), (200, 215, 235))
    x = -c.rng.uniform(0, 0.1)
    while x < 1:
        w, top = c.rng.uniform(0.1, 0.2), c.rng.uniform(0.08, 0.45)
        c.shape("rectangle", (x, top, x + w, 0.85), c.vary((105, 105, 112), 28))
        for wx, wy in itertools.product(np.arange(x + 0.02, x + w - 0.03, 0.05), np.arange(top + 0.03, 0.8, 0.07)):
            c.shape("rectangle", (wx, wy, wx + 0.025, wy + 0.035), (235, 220, 140))
        x += w + 0.01
    c.band(0.85, 1, (65, 65, 70))


def _mountain(c):
    h = c.horizon(0.62)
    c.band(0, h, (110, 160, 220), (170, 200, 235))
    for x in np.sort(c.rng.uniform(0, 1, 3)):
        top = c.rng.uniform(0.15, 0.3)
        c.shape("polygon", [(x - 0.4, h), (x, top), (x + 0.4, h)], c.vary((110, 100, 130), 10))
        c.shape("polygon", [(x - 0.1, top + 0.1), (x, top), (x + 0.1, top + 0.1)], (245, 245, 250))
    c.band(h, 1, (95, 145, 70), (75, 120, 55))


def _wooden_floor(c):
    h = c.horizon(0.35)
    c.band(0, h, (228, 212, 185), (215, 198, 170))
    for y in np.arange(h, 1, 0.08):
        c.band(y, y + 0.08, c.vary((170, 112, 60), 15))
        c.shape("line", (0, y, 1, y), (95, 60, 30), width=0.008)


def _water(c, surface=(35, 95, 165), deep=(20, 70, 140), ripple=(90, 155, 215), sky=(170, 210, 240)):
    h = c.horizon(0.2)
    c.band(0, h, sky, (200, 225, 245))
    c.band(h, 1, surface, deep)
    for x, y in zip(c.rng.uniform(-0.1, 1, 14), c.rng.uniform(h + 0.03, 1, 14)):
        c.pen.arc((np.array([x, y, x + 0.16, y + 0.05]) * c.side).tolist(), 200, 340, fill=ripple,
                  width=round(0.012 * c.side))


def _milk(c):
    _water(c, surface=(250, 247, 236), deep=(240, 235, 220), ripple=(215, 208, 190), sky=(255, 200, 160))


def _wheat(c):
    h = c.horizon(0.4)
    c.band(0, h, (145, 195, 240), (185, 215, 240))
    c.band(h, 1, (222, 182, 82), (200, 160, 60))
    for x in c.rng.uniform(0, 1, 60):
        y = c.rng.uniform(h, 0.95)
        c.shape("line", (x, y, x + 0.01, y + 0.08), c.vary((180, 140, 45), 25), width=0.008)


def _rug_in_forest(c):
    c.band(0, 0.6, (40, 80, 45), (30, 60, 35))
    for x in c.rng.uniform(0, 1, 7):
        c.shape("rectangle", (x, 0, x + 0.05, 0.6), (85, 58, 35))
    c.band(0.6, 1, (60, 90, 40))
    c.shape("ellipse", (0.02, 0.5, 0.98, 1.02), (200, 150, 215))  # fringe
    c.shape("ellipse", (0.05, 0.53, 0.95, 0.99), c.vary((130, 55, 160), 8))


def _autumn(c):
    c.band(0, 1, (180, 205, 230), (170, 115, 55))
    x = c.rng.choice([0.15, 0.7])
    c.shape("rectangle", (x, 0.2, x + 0.12, 0.75), (90, 55, 30))
    for _ in range(40):
        cx, cy, r = c.rng.uniform(x - 0.3, x + 0.4), c.rng.uniform(0, 0.45), c.rng.uniform(0.04, 0.1)
        c.shape("ellipse", (cx - r, cy - r, cx + r, cy + r), RAINBOW[c.rng.integers(0, 3)])
    c.band(0.75, 1, (175, 110, 50), (150, 90, 40))
    for lx, ly in c.rng.uniform(0, 1, (20, 2)) * (1, 0.25) + (0, 0.75):
        c.shape("ellipse", (lx, ly, lx + 0.025, ly + 0.015), RAINBOW[c.rng.integers(0, 3)])


def _sunflowers(c):
    h = c.horizon(0.35)
    c.band(0, h, (140, 195, 240))
    c.band(h, 1, (75, 160, 55), (55, 130, 40))
    for x in np.linspace(0.05, 0.95, 6) + c.rng.uniform(-0.04, 0.04, 6):
        y = c.rng.uniform(h - 0.15, h + 0.05)
        c.shape("line", (x, y, x, y + 0.35), (40, 110, 30), width=0.015)
        c.shape("ellipse", (x - 0.07, y - 0.07, x + 0.07, y + 0.07), (245, 200, 30))
        c.shape("ellipse", (x - 0.03, y - 0.03, x + 0.03, y + 0.03), (110, 70, 20))


def _mirror(c):
    h = c.horizon(0.4)
    c.band(0, h, (90, 80, 75), (100, 90, 85))
    c.band(h, 1, (205, 210, 220), (150, 155, 170))
    for x in c.rng.uniform(-0.3, 0.8, 3):
        c.shape("polygon", [(x, 1), (x + 0.08, 1), (x + 0.38, h), (x + 0.3, h)], (228, 232, 240))
    c.shape("line", (0, h, 1, h), (180, 150, 90), width=0.02)  # the frame


def _crowded_sidewalk(c):
    h = c.horizon(0.58)
    c.band(0, h, (95, 95, 105), (80, 80, 90))
    for x in np.arange(-0.02, 1, 0.065) + c.rng.uniform(-0.01, 0.01):
        top = c.rng.uniform(0.12, 0.25)
        c.shape("rectangle", (x, top + 0.08, x + 0.05, h), c.vary(RAINBOW[c.rng.integers(6)], 40))
        skin = c.vary((215, 170, 135), 40)
        c.shape("ellipse", (x + 0.005, top, x + 0.045, top + 0.06), skin)
    c.band(h, 1, (182, 180, 172), (165, 163, 155))
    for y in np.arange(h + 0.08, 1, 0.12):
        c.shape("line", (0, y, 1, y), (140, 138, 132), width=0.006)


def _white_rug(c):
    h = c.horizon(0.4)
    c.band(0, h, (135, 150, 175), (150, 162, 185))
    c.band(h, 1, (242, 240, 232))
    for x, y in c.rng.uniform(0, 1, (80, 2)) * (1, 1 - h) + (0, h):
        c.shape("line", (x, y, x + 0.01, y + 0.03), (222, 220, 210), width=0.006)


def _pink_fabric(c):
    side = c.side
    v, u = np.mgrid[0:side, 0:side] / side
    fold = 0.9 + 0.1 * np.sin((u * 1.5 + v) * 12 + c.rng.uniform(0, 6))
    arr = np.array([238, 158, 190]) * fold[..., None]
    c.img.paste(Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "RGB"))


def _eiffel_tower(c):
    h = c.horizon(0.72)
    c.band(0, h, (180, 205, 235), (210, 222, 238))
    x = c.rng.choice([0.22, 0.78])
    steel = (80, 70, 62)
    c.shape("polygon", [(x - 0.2, h), (x - 0.02, 0.05), (x + 0.02, 0.05), (x + 0.2, h)], steel)
    c.shape("ellipse", (x - 0.1, h - 0.15, x + 0.1, h + 0.1), (200, 216, 236))  # the arch
    for y in (0.3, 0.5):
        c.shape("rectangle", (x - 0.14 * y / 0.5, y, x + 0.14 * y / 0.5, y + 0.025), steel)
    c.band(h, 1, (110, 150, 80), (90, 130, 65))


def _dirt_road(c):
    h = c.horizon(0.35)
    c.band(0, h, (150, 200, 240))
    c.band(h, 1, (95, 150, 60), (80, 130, 50))
    c.shape("polygon", [(0.46, h), (0.54, h), (1.0, 1), (0.0, 1)], (150, 108, 68))
    for x, y in c.rng.uniform(0, 1, (25, 2)) * (0.6, 1 - h) + (0.2, h):
        c.shape("ellipse", (x, y, x + 0.015, y + 0.01), (120, 85, 50))


def _blue_house(c):
    h = c.horizon(0.7)
    c.band(0, h, (165, 205, 240))
    x = c.rng.uniform(0.1, 0.2)
    c.shape("rectangle", (x, 0.32, x + 0.7, h), c.vary((50, 90, 190), 10))
    c.shape("polygon", [(x - 0.05, 0.32), (x + 0.35, 0.08), (x + 0.75, 0.32)], (150, 50, 40))
    for wx in (x + 0.08, x + 0.5):
        c.shape("rectangle", (wx, 0.4, wx + 0.12, 0.52), (240, 240, 225))
    c.band(h, 1, (85, 150, 60))


_MAKERS = [_beach, _jungle, _snow, _cobblestone, _city, _mountain, _wooden_floor, _water, _wheat, _rug_in_forest,
           _autumn, _sunflowers, _mirror, _crowded_sidewalk, _white_rug, _milk]
_EVAL_MAKERS = {"on top of pink fabric": _pink_fabric, "with the eiffel tower in the background": _eiffel_tower,
                "on top of a dirt road": _dirt_road, "with a blue house in the background": _blue_house}
SCENES = {None: _neutral, **{_phrase(t): f for t, f in zip(RECONTEXT, _MAKERS, strict=True)}, **_EVAL_MAKERS}
SCENE_NAMES = tuple(s for s in SCENES if s is not None)
LIQUIDS = {"floating on top of water": (40, 100, 170), "floating in an ocean of milk": (248, 244, 232)}


def background(scene: str | None, seed: int, size: int = 64) -> Image.Image:
    """The scene alone, as `render` would draw it behind an object (same seed, same jitter)."""
    if scene is not None and scene not in SCENES:
        raise ValueError(f"world scene {scene!r} is not one of {SCENE_NAMES}")
    return _background(scene, _rng(seed, "scene", scene), size * SS).reduce(SS)


def _background(scene, rng, side) -> Image.Image:
    canvas = _Canvas(side, rng)
    SCENES[scene](canvas)
    return canvas.img


# ------------------------------------------------------------------------------------------------- accessories


def _hat(draw, cx, base, h, kind):
    """A hat `h` px tall-ish, centred on cx, its band resting on y = base."""
    if kind == "wearing a red hat":
        draw.chord((cx - 0.5 * h, base - 0.7 * h, cx + 0.5 * h, base + 0.7 * h), 180, 360, fill=(200, 25, 30))
        draw.rounded_rectangle((cx - 0.75 * h, base - 0.1 * h, cx + 0.75 * h, base + 0.08 * h), 0.08 * h,
                               fill=(170, 20, 25))
    elif kind == "wearing a santa hat":
        draw.polygon([(cx - 0.5 * h, base), (cx + 0.5 * h, base), (cx + 0.7 * h, base - 0.9 * h)], fill=(210, 30, 35))
        draw.rounded_rectangle((cx - 0.58 * h, base - 0.16 * h, cx + 0.58 * h, base + 0.08 * h), 0.1 * h,
                               fill=(250, 250, 250))
        draw.ellipse((cx + 0.55 * h, base - 1.05 * h, cx + 0.85 * h, base - 0.75 * h), fill=(250, 250, 250))
    elif kind == "wearing a black top hat and a monocle":
        draw.rectangle((cx - 0.35 * h, base - 0.95 * h, cx + 0.35 * h, base), fill=(20, 20, 22))
        draw.rectangle((cx - 0.35 * h, base - 0.25 * h, cx + 0.35 * h, base - 0.12 * h), fill=(90, 90, 95))
        draw.rectangle((cx - 0.62 * h, base - 0.06 * h, cx + 0.62 * h, base + 0.06 * h), fill=(20, 20, 22))
    else:  # wizard
        draw.polygon([(cx - 0.45 * h, base), (cx + 0.45 * h, base), (cx + 0.1 * h, base - 1.3 * h)], fill=(120, 40, 160))
        draw.ellipse((cx - 0.7 * h, base - 0.1 * h, cx + 0.7 * h, base + 0.1 * h), fill=(100, 30, 140))
        for sx, sy in ((-0.15, -0.4), (0.12, -0.7), (0.05, -0.25)):
            draw.ellipse((cx + (sx - 0.06) * h, base + (sy - 0.06) * h, cx + (sx + 0.06) * h, base + (sy + 0.06) * h),
                         fill=(250, 220, 60))


def _accessory_under(canvas: Image.Image, kind, box, shape):
    """What goes behind the object: a wizard's cape."""
    if kind != "in a purple wizard outfit":
        return
    x0, y0, x1, y1 = box
    w, neck = x1 - x0, y0 + NECK_Y[shape] * (y1 - y0)
    ImageDraw.Draw(canvas).polygon([(x0 - 0.15 * w, y1), (x1 + 0.15 * w, y1), (x1 - 0.2 * w, neck),
                                    (x0 + 0.2 * w, neck)], fill=(110, 35, 150))


def _accessory_over(canvas: Image.Image, kind, box, shape, obj_alpha, rng):
    """What goes on or beside the object, placed from its bounding box and its class's face/neck heights."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, face, neck = (x0 + x1) / 2, y0 + FACE_Y[shape] * h, y0 + NECK_Y[shape] * h
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(0.045 * w))
    if kind in ("wearing a red hat", "wearing a santa hat", "wearing a black top hat and a monocle",
                "in a purple wizard outfit"):
        _hat(draw, cx, y0 + 0.07 * h, 0.5 * w, kind)
    if kind == "wearing a black top hat and a monocle":
        r = 0.12 * w
        draw.ellipse((cx + 0.14 * w - r, face - r, cx + 0.14 * w + r, face + r), outline=(225, 185, 60), width=line)
        draw.line((cx + 0.14 * w + r, face, cx + 0.3 * w, face + 0.35 * h), fill=(225, 185, 60), width=line // 2)
    elif kind == "wearing pink glasses":
        r = 0.12 * w
        for ex in (cx - 0.15 * w, cx + 0.15 * w):
            draw.ellipse((ex - r, face - r, ex + r, face + r), fill=(255, 175, 210), outline=(235, 50, 145), width=line)
        draw.line((cx - 0.15 * w + r, face, cx + 0.15 * w - r, face), fill=(235, 50, 145), width=line)
    elif kind == "wearing a rainbow scarf":
        band = Image.new("RGB", canvas.size)
        stripe = max(1, round(w / 6))
        bd = ImageDraw.Draw(band)
        for i, x in enumerate(range(int(x0), int(x1) + 1, stripe)):
            bd.rectangle((x, 0, x + stripe, canvas.height), fill=RAINBOW[i % len(RAINBOW)])
        within = Image.new("L", canvas.size)
        ImageDraw.Draw(within).rectangle((x0, neck - 0.08 * h, x1, neck + 0.08 * h), fill=255)
        canvas.paste(band, (0, 0), Image.fromarray(np.minimum(np.asarray(within), np.asarray(obj_alpha))))
        tail = cx + 0.12 * w
        for i in range(6):
            draw.rectangle((tail, neck + i * 0.05 * h, tail + 0.14 * w, neck + (i + 1) * 0.05 * h), fill=RAINBOW[i])
    elif kind == "next to a green cup":
        side = round(0.6 * max(w, h))
        cup = _object(Spec("cup", "green"), side, rng, shape="cup")
        left = cx > canvas.width / 2
        x = x0 - 0.9 * side if left else x1 - 0.1 * side
        canvas.paste(cup, (round(x), round(y1 - side)), cup)


# ------------------------------------------------------------------------------------------------- rendering


def render(spec: Spec, seed: int, size: int = 64) -> Image.Image:
    """The image of `spec` (RGB, `size` px square). The seed varies pose, scale, tilt, lighting and the scene's
    layout, and only the seed does: two specs drawn with one seed differ only where the specs differ."""
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"world image size must be an integer of at least 16 px, got {size!r}")
    rng = _rng(seed, "pose")
    side = size * SS
    canvas = _background(spec.scene, _rng(seed, "scene", spec.scene), side)
    scale, dx, dy, tilt = rng.uniform(0.42, 0.54), rng.uniform(-0.12, 0.12), rng.uniform(-0.05, 0.05), rng.uniform(-12, 12)
    light = rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, 3)  # brightness and a slight colour cast
    obj = _object(spec, round(scale * side), rng).rotate(tilt, resample=Image.Resampling.BICUBIC, expand=True)
    pos = (round((0.5 + dx) * side - obj.width / 2), round((0.62 + dy) * side - obj.height / 2))
    alpha = Image.new("L", canvas.size)
    alpha.paste(obj.getchannel("A"), pos)
    box = alpha.getbbox() or (0, 0, side, side)
    shape = "cube" if spec.property == "cube shaped" else spec.class_noun
    _accessory_under(canvas, spec.accessory, box, shape)
    if spec.scene == "on top of a mirror":  # the reflection, faint and upside down, below the object
        mirrored = obj.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        mirrored.putalpha(mirrored.getchannel("A").point(lambda a: a * 2 // 5))
        canvas.paste(mirrored, (pos[0], 2 * box[3] - pos[1] - obj.height), mirrored)
    canvas.paste(obj, pos, obj)
    if spec.scene in LIQUIDS:  # the object floats: its lower part is under the surface
        level = box[3] - 0.2 * (box[3] - box[1])
        under = np.asarray(alpha, np.float32) * (np.arange(side) > level)[:, None] * 0.7
        liquid = Image.new("RGB", canvas.size, LIQUIDS[spec.scene])
        canvas.paste(liquid, (0, 0), Image.fromarray(under.round().astype(np.uint8)))
    _accessory_over(canvas, spec.accessory, box, shape, alpha, _rng(seed, "accessory"))
    out = np.asarray(canvas.reduce(SS), np.float32) * light
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8), "RGB")


# ------------------------------------------------------------------------------------------------- subjects and data


def _accents(colour: str) -> list[str]:
    """Colours far enough from `colour` that a pattern in them reads at 32 px."""
    return [c for c in COLOURS if np.linalg.norm(np.subtract(COLOURS[c], COLOURS[colour])) > 140]


def make_subject(index: int, seed: int = 0) -> Spec:
    """World subject `index`: a reserved (class, colour, pattern), its accent colour drawn by `seed`."""
    if not 0 <= index < len(SUBJECT_COMBOS):
        raise ValueError(f"world subject index must be in 0..{len(SUBJECT_COMBOS) - 1}, got {index}")
    class_noun, colour, pattern = SUBJECT_COMBOS[index]
    accents = _accents(colour)
    return Spec(class_noun, colour, pattern, accents[_rng(seed, "subject", index).integers(len(accents))])


def _pretraining_spec(rng: np.random.Generator) -> Spec:
    """One spec from the pretraining distribution (it may be a reserved instance: callers reject those)."""
    colour = tuple(COLOURS)[rng.integers(len(COLOURS))]
    pattern = PATTERNS[rng.choice(len(PATTERNS), p=[0.4, 0.2, 0.2, 0.2])]
    accents = _accents(colour)
    return Spec(
        class_noun=CLASSES[rng.integers(len(CLASSES))], colour=colour, pattern=pattern,
        accent=None if pattern == "plain" else accents[rng.integers(len(accents))],
        scene=SCENE_NAMES[rng.integers(len(SCENE_NAMES))] if rng.random() < 0.8 else None,
        accessory=ACCESSORY_NAMES[rng.integers(len(ACCESSORY_NAMES))] if rng.random() < 0.25 else None,
        property=PROPERTY_NAMES[rng.integers(len(PROPERTY_NAMES))] if rng.random() < 0.2 else None,
    )


def _allowed_specs(rng: np.random.Generator, n: int) -> list[Spec]:
    reserved, specs = set(SUBJECT_COMBOS), []
    while len(specs) < n:
        spec = _pretraining_spec(rng)
        if spec.combo() not in reserved:
            specs.append(spec)
    return specs


def pretraining_specs(n: int, seed: int) -> list[Spec]:
    """`n` specs from the pretraining distribution: every class, colour, pattern, scene, accessory and property,
    mixed freely, except the subjects' reserved instances (as drawn, so a "red" property cannot sneak one in)."""
    return _allowed_specs(_rng(seed, "pretraining"), n)


def partial_caption(spec: Spec, rng: np.random.Generator) -> str:
    """A caption that names only some of what the image shows: the class always; the look (colours and pattern)
    in full, by colour alone, by pattern alone or not at all; accessory, scene and property each kept with
    probability 1/2. Prompts such as "a toy on top of pink fabric" say no colour: models trained on full
    captions only never saw one."""
    colour, accent = spec.look()
    look = [f"{colour} and {accent} {spec.pattern}" if spec.pattern != "plain" else colour, colour,
            None if spec.pattern == "plain" else spec.pattern, None][rng.integers(4)]
    prop = None if spec.property in COLOUR_PROPERTIES else spec.property
    keep = rng.random(3) < 0.5
    words = ("a", prop if keep[0] else None, look, spec.class_noun, spec.accessory if keep[1] else None,
             spec.scene if keep[2] else None)
    return " ".join(w for w in words if w)


class WorldStream:
    """Fresh pretraining renders for every training step: batch `step` is a pure function of (seed, purpose,
    step), so training never sees an image twice (a fixed set of a few thousand overfits the student) and the
    same seed still gives the same weights. `purpose` names an independent stream: models that must not share
    data (the supervisor's text encoder and the evaluator CLIP) draw from different ones. A fraction
    `partial_captions` of the captions are `partial_caption`s, the rest full ones."""

    def __init__(self, seed: int, purpose: str, size: int = 32, partial_captions: float = 0.5):
        if not 0.0 <= partial_captions <= 1.0:
            raise ValueError(f"partial_captions must be in [0, 1], got {partial_captions!r}")
        self.seed, self.purpose, self.size, self.partial_captions = seed, purpose, size, partial_captions

    def batch(self, step: int, n: int) -> tuple[np.ndarray, list[str], list[Spec]]:
        """(uint8 images (n, size, size, 3), captions, specs) of training step `step`."""
        rng = _rng(self.seed, self.purpose, step)
        specs = _allowed_specs(rng, n)
        image_seeds = rng.integers(0, 2**31, n)
        images = np.stack([np.asarray(render(s, int(i), self.size)) for s, i in zip(specs, image_seeds)])
        captions = [partial_caption(s, rng) if rng.random() < self.partial_captions else caption(s) for s in specs]
        return images, captions, specs


def _image_seeds(n: int, seed: int, purpose: str) -> list[int]:
    return [int(s) for s in _rng(seed, purpose).integers(0, 2**31, n)]


def reference_spec(subject: Spec) -> Spec:
    """What a reference photo shows: the subject alone on the neutral backdrop."""
    return replace(subject, scene=None, accessory=None, property=None)


def reference_seeds(n: int, seed: int) -> list[int]:
    """The image seeds of a subject's `n` reference photos (each gives its own pose and backdrop noise)."""
    return _image_seeds(n, seed, "references")


def subject_references(subject: Spec, n: int = 4, seed: int = 0, out_dir: str | Path = "data/world_subject",
                       size: int = 64) -> list[Path]:
    """Write `n` reference photos of `subject` (neutral backdrop, varied pose) as `00.jpg`... into `out_dir`,
    atomically: the folder of photos `tasks/prepare.py` reads as `subject.images`."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for i, s in enumerate(reference_seeds(n, seed)):
            render(reference_spec(subject), s, size).save(tmp / f"{i:02d}.jpg", quality=95)
    return [out_dir / f"{i:02d}.jpg" for i in range(n)]


def scene_separation(size: int = 32, seeds: tuple[int, ...] = (0, 1, 2), grid: int = 4):
    """How far apart the scenes' backgrounds are: each scene's signature is its mean colour in a `grid` x `grid`
    layout (averaged over `seeds`); returns (smallest RMS distance between two scenes' signatures, that pair,
    the signatures). The world is only useful if every scene is told apart from every other."""
    def signature(scene):
        cells = [np.asarray(background(scene, s, size), np.float32).reshape(grid, size // grid, grid, size // grid, 3)
                 .mean((1, 3)) for s in seeds]
        return np.mean(cells, 0)

    sigs = {scene: signature(scene) for scene in SCENES}
    dist = {(a, b): float(np.sqrt(((sigs[a] - sigs[b]) ** 2).sum(-1).mean()))
            for a, b in itertools.combinations(SCENES, 2)}
    pair = min(dist, key=dist.get)
    return dist[pair], pair, sigs


"""The miniature world: deterministic captioned images whose scenes, accessories and properties are visible."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import paths
from PIL import Image

from proxytune.io import read_jsonl
from proxytune.prompts import EVAL_PROMPTS, PROXY_BANK
from testbed import world
from testbed.world import Spec, apply_template, caption, render

BALL = Spec("ball", "yellow", "dotted", "blue")


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, np.int16)


def changed(a: Image.Image, b: Image.Image, tol: int = 40) -> np.ndarray:
    """Where two renders differ visibly (summed absolute RGB difference above `tol`)."""
    return np.abs(pixels(a) - pixels(b)).sum(-1) > tol


def count(img: Image.Image, colour, tol: int = 60) -> int:
    return int((np.abs(pixels(img) - np.array(colour)).sum(-1) < tol).sum())


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("size", [32, 64])
def test_render_is_a_pure_function_of_spec_and_seed(size):
    spec = replace(BALL, scene="on the beach", accessory="wearing a red hat")
    img = render(spec, 3, size)
    assert img.mode == "RGB" and img.size == (size, size)
    assert render(spec, 3, size).tobytes() == img.tobytes()
    assert render(spec, 4, size).tobytes() != img.tobytes()
    assert render(replace(spec, scene="in the snow"), 3, size).tobytes() != img.tobytes()


def test_render_does_not_depend_on_the_process():
    """Seeds are mixed with sha256, never Python's per-process salted hash()."""
    code = ("import hashlib; from testbed.world import Spec, render; "
            "print(hashlib.sha256(render(Spec('cup', 'green', 'striped', 'white', scene='in the jungle'), 7, 32)"
            ".tobytes()).hexdigest())")
    here = hashlib.sha256(render(Spec("cup", "green", "striped", "white", scene="in the jungle"), 7, 32).tobytes())
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123"}, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == here.hexdigest()


def test_stream_batches_are_pure_functions_of_seed_purpose_and_step():
    stream = world.WorldStream(5, "gpt", size=32)
    images, captions, specs = stream.batch(3, 12)
    again = world.WorldStream(5, "gpt", size=32).batch(3, 12)
    assert images.dtype == np.uint8 and images.shape == (12, 32, 32, 3)
    assert np.array_equal(images, again[0]) and captions == again[1] and specs == again[2]
    for other in (world.WorldStream(5, "gpt", 32).batch(4, 12), world.WorldStream(5, "vq", 32).batch(3, 12),
                  world.WorldStream(6, "gpt", 32).batch(3, 12)):
        assert not np.array_equal(images, other[0])
    reserved = set(world.SUBJECT_COMBOS)
    assert not any(s.combo() in reserved for s in specs)


def test_stream_mixes_full_and_partial_captions():
    specs_captions = [(s, c) for step in range(8) for _, cs, ss in [world.WorldStream(0, "x", 32).batch(step, 32)]
                      for s, c in zip(ss, cs)]
    full = sum(c == caption(s) for s, c in specs_captions) / len(specs_captions)
    assert 0.4 < full < 0.8  # half are full captions, and some partial ones happen to be full
    assert all(s.class_noun in c.split() for s, c in specs_captions)
    only_full = world.WorldStream(0, "x", 32, partial_captions=0.0).batch(0, 16)
    assert only_full[1] == [caption(s) for s in only_full[2]]
    with pytest.raises(ValueError, match="partial_captions"):
        world.WorldStream(0, "x", 32, partial_captions=1.5)


def test_partial_captions_name_the_class_and_a_subset_of_what_is_drawn():
    spec = Spec("ball", "red", "striped", "white", scene="on the beach", accessory="wearing a red hat",
                property="shiny")
    rng = np.random.default_rng(0)
    seen = {world.partial_caption(spec, rng) for _ in range(400)}
    full_words = set(caption(spec).split())
    assert all(set(c.split()) <= full_words and "ball" in c.split() for c in seen)
    assert "a ball" in seen and "a ball on the beach" in seen and "a red ball" in seen and "a striped ball" in seen
    assert caption(spec) in seen


# ---------------------------------------------------------------- captions and prompts


def test_captions_describe_the_spec():
    striped = Spec("ball", "red", "striped", "white", scene="on the beach")
    assert caption(striped) == "a red and white striped ball on the beach"
    assert caption(striped, "sks") == "a sks ball on the beach"
    hatted = Spec("cup", "green", accessory="wearing a red hat", scene="in the snow", property="shiny")
    assert caption(hatted) == "a shiny green cup wearing a red hat in the snow"
    assert caption(hatted, "sks") == "a shiny sks cup wearing a red hat in the snow"
    # A colour property repaints the instance: said once without an identifier, as a prefix with one.
    repainted = replace(BALL, property="red")
    assert caption(repainted) == "a red and blue dotted ball"
    assert caption(repainted, "sks") == "a red sks ball"
    assert repainted.combo() == ("ball", "red", "dotted")


def test_every_bank_and_eval_prompt_is_a_world_image():
    subject = world.make_subject(0)
    for template in PROXY_BANK + EVAL_PROMPTS:
        spec = apply_template(subject, template)
        assert caption(spec, "sks") == template.format(f"sks {subject.class_noun}")
    assert set(world.SCENE_NAMES) >= {t[len("a {} "):] for t in world.RECONTEXT}


@pytest.mark.parametrize("template", ["a {} on the moon", "a golden {}", "{} on the beach", "a {}"])
def test_unknown_prompts_are_refused(template):
    with pytest.raises(ValueError, match="prompt template"):
        apply_template(BALL, template)


@pytest.mark.parametrize("fields, rule", [
    ({"class_noun": "dog"}, "class_noun"), ({"colour": "teal"}, "colour"), ({"pattern": "plaid"}, "pattern"),
    ({"accent": None}, "accent"), ({"accent": "yellow"}, "accent"), ({"scene": "on the moon"}, "scene"),
    ({"accessory": "wearing a crown"}, "accessory"), ({"property": "golden"}, "property"),
])
def test_bad_specs_fail_naming_the_field(fields, rule):
    with pytest.raises(ValueError, match=rule):
        replace(BALL, **fields)


def test_bad_seed_or_size_fails():
    with pytest.raises(ValueError, match="seed"):
        render(BALL, -1)
    with pytest.raises(ValueError, match="size"):
        render(BALL, 0, size=8)


# ---------------------------------------------------------------- subjects and pretraining


def test_subjects_are_never_shown_in_pretraining():
    specs = world.pretraining_specs(3000, seed=0)
    assert specs == world.pretraining_specs(3000, seed=0)
    seen = {s.combo() for s in specs}
    subjects = [world.make_subject(i, seed) for i in range(len(world.SUBJECT_COMBOS)) for seed in range(3)]
    assert not seen & {s.combo() for s in subjects}
    for s in subjects:
        assert s.pattern != "plain"
        # ...but each of its parts is: the class, the colour, the pattern, and the class in that pattern.
        assert any(c[0] == s.class_noun and c[1] == s.colour for c in seen)
        assert any(c[0] == s.class_noun and c[2] == s.pattern for c in seen)
        assert any(c[1] == s.colour and c[2] == s.pattern for c in seen)
    assert {s.scene for s in specs} == set(world.SCENES)
    assert {s.accessory for s in specs} == {None, *world.ACCESSORY_NAMES}
    assert {s.property for s in specs} == {None, *world.PROPERTY_NAMES}
    assert {s.class_noun for s in specs} == set(world.CLASSES)
    assert {s.pattern for s in specs} == set(world.PATTERNS)
    with pytest.raises(ValueError, match="subject index"):
        world.make_subject(len(world.SUBJECT_COMBOS))


def test_references_are_a_folder_prepare_reads(tmp_path, log):
    from tasks import prepare

    subject = world.make_subject(0)
    files = world.subject_references(subject, n=4, seed=1, out_dir=tmp_path / "refs", size=64)
    assert [p.name for p in files] == ["00.jpg", "01.jpg", "02.jpg", "03.jpg"]
    assert sorted(p.name for p in (tmp_path / "refs").iterdir()) == [p.name for p in files]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refs"]
    images = []
    for p in files:
        with Image.open(p) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (64, 64)
            images.append(pixels(img))
    assert all(changed(Image.fromarray(a.astype(np.uint8)), Image.fromarray(images[0].astype(np.uint8))).mean() > 0.05
               for a in images[1:])  # the pose varies

    params = {"subject": {"images": str(tmp_path / "refs"), "identifier": "sks", "class_noun": subject.class_noun,
                          "caption": "a {}"}, "prepare": {"resolution": 64}}
    prepare.run(params, log, paths(tmp_path, "prepare"))
    rows = read_jsonl(paths(tmp_path, "prepare")["out"] / "captions.jsonl")
    assert [r["source"] for r in rows] == [p.name for p in files]
    assert {r["caption"] for r in rows} == {"a sks toy"}


# ---------------------------------------------------------------- what the images show


def test_scenes_are_told_apart_by_their_backgrounds():
    gap, pair, signatures = world.scene_separation(size=32)
    assert gap > 20, f"scenes {pair} look alike: RMS distance {gap:.1f}"
    # A rendered image (object, accessory and all) is nearest its own scene's background signature.
    border = np.ones((4, 4), bool)
    border[1:3, 1:3] = False  # the object sits in the middle
    hits = total = 0
    for k, scene in enumerate(world.SCENES):
        for seed in (100, 101):
            spec = Spec(world.CLASSES[(k + seed) % 5], "red", "striped", "white", scene=scene,
                        accessory=world.ACCESSORY_NAMES[k % 7] if seed % 2 else None)
            sig = pixels(render(spec, seed, 32)).reshape(4, 8, 4, 8, 3).mean((1, 3))
            dist = {s: np.sqrt(((sig - g) ** 2).sum(-1)[border].mean()) for s, g in signatures.items()}
            hits += min(dist, key=dist.get) == scene
            total += 1
    assert hits / total >= 0.9, f"only {hits}/{total} renders matched their scene"


@pytest.mark.parametrize("accessory, colour", [
    ("wearing a red hat", (200, 25, 30)), ("wearing a santa hat", (210, 30, 35)),
    ("wearing a rainbow scarf", (60, 170, 60)), ("wearing a black top hat and a monocle", (20, 20, 22)),
    ("wearing pink glasses", (255, 175, 210)), ("next to a green cup", (50, 160, 60)),
    ("in a purple wizard outfit", (120, 40, 160)),
])
@pytest.mark.parametrize("size", [32, 64])
def test_accessories_are_drawn_in_their_colour(accessory, colour, size):
    base = replace(BALL, accent="orange", scene="on the beach")
    plain, worn = render(base, 11, size), render(replace(base, accessory=accessory), 11, size)
    diff = changed(plain, worn)
    assert 0.01 < diff.mean() < 0.4, f"{accessory}: {diff.mean():.3f} of the image changed"
    assert count(worn, colour) > count(plain, colour) + size * size // 400


@pytest.mark.parametrize("size", [32, 64])
def test_properties_change_the_object(size):
    base = replace(BALL, scene="in the jungle")
    plain = render(base, 2, size)

    def change(prop):
        img = render(replace(base, property=prop), 2, size)
        mask = changed(plain, img)
        assert mask.mean() > 0.02, f"{prop}: only {mask.mean():.3f} of the image changed"
        assert (pixels(img)[: size // 4] == pixels(plain)[: size // 4]).all(), "the scene, pose and light moved"
        return pixels(plain)[mask].mean(0), pixels(img)[mask].mean(0), img

    _, after_red, _ = change("red")
    assert after_red[0] > after_red[1] + 60 and after_red[0] > after_red[2] + 60
    _, after_purple, _ = change("purple")
    assert after_purple[2] > after_purple[1] + 40
    _, _, shiny = change("shiny")
    assert count(shiny, (255, 255, 255), 90) > count(plain, (255, 255, 255), 90)
    before, after, _ = change("wet")
    assert after.sum() < before.sum() and after[2] - after[0] > before[2] - before[0]
    cube = render(replace(base, property="cube shaped"), 2, size)
    assert changed(plain, cube).mean() > 0.04  # a new silhouette, not a recolouring
    assert (pixels(cube)[: size // 4] == pixels(plain)[: size // 4]).all()

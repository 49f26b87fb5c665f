"""Stage `synthesize`: proxy images with a manifest from which every image regenerates exactly."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from proxytune.diffusion import load_pipeline, sample
from proxytune.io import read_jsonl
from proxytune.params import ProxytuneError, load_params
from proxytune.prompts import ACCESSORIES, PROPERTIES, RECONTEXT
from tasks import synthesize
from tasks.synthesize import proxy_prompts

KINDS = {"recontext": RECONTEXT, "accessory": ACCESSORIES, "property": PROPERTIES}


def kind_of(prompt: str, phrase: str = "sks toy") -> str:
    (kind,) = [k for k, templates in KINDS.items() if prompt in {t.format(phrase) for t in templates}]
    return kind


def test_proxy_prompts_mix_kinds_and_cover_the_bank():
    bank_size = sum(len(t) for t in KINDS.values())
    for n in range(3, 2 * bank_size + 1):
        prompts = proxy_prompts("sks toy", n)
        assert {kind_of(p) for p in prompts} == set(KINDS), n
    one_cycle = proxy_prompts("sks toy", bank_size)
    assert sorted(one_cycle) == sorted(t.format("sks toy") for ts in KINDS.values() for t in ts)
    assert proxy_prompts("sks toy", 2 * bank_size) == one_cycle * 2  # cyclic


def test_run_writes_images_and_manifest(synthesized):
    params = load_params()
    n = int(params["synthesize"]["num_images"])
    rows = read_jsonl("outputs/synthesize/manifest.jsonl")
    images = sorted(Path("outputs/synthesize/images").glob("*.png"))
    assert len(rows) == len(images) == n >= 3
    assert [r["prompt"] for r in rows] == proxy_prompts("sks toy", n)
    assert [kind_of(r["prompt"]) for r in rows[:3]] == ["recontext", "accessory", "property"]
    assert len({r["seed"] for r in rows}) == n and all(isinstance(r["seed"], int) for r in rows)
    for r in rows:
        path = Path("outputs/synthesize") / r["file"]
        assert path in images
        assert r["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert r["steps"] == params["synthesize"]["sample_steps"]
        assert r["guidance_scale"] == params["synthesize"]["guidance_scale"]
        res = params["prepare"]["resolution"]
        assert Image.open(path).size == (res, res)


def test_each_proxy_regenerates_exactly_from_its_row(synthesized):
    params = load_params()
    res = int(params["prepare"]["resolution"])
    rows = read_jsonl("outputs/synthesize/manifest.jsonl")
    pipe = load_pipeline(params["supervisor"]["model"], lora_dir="outputs/supervise")

    def alone(prompt, seed):
        (img,) = sample(pipe, [prompt], [seed], rows[0]["steps"], rows[0]["guidance_scale"], res)
        return np.asarray(img)

    for r in rows:  # each row alone, batch 1, whatever its position in the stage's batches was
        stored = np.asarray(Image.open(Path("outputs/synthesize") / r["file"]).convert("RGB"))
        assert np.array_equal(alone(r["prompt"], r["seed"]), stored), r["file"]
    # the seed and the supervisor's LoRA really determine the pixels
    stored = np.asarray(Image.open(Path("outputs/synthesize") / rows[1]["file"]).convert("RGB"))
    assert not np.array_equal(alone(rows[1]["prompt"], rows[1]["seed"] + 1), stored)
    base = load_pipeline(params["supervisor"]["model"])
    (img,) = sample(base, [rows[1]["prompt"]], [rows[1]["seed"]], rows[1]["steps"], rows[1]["guidance_scale"], res)
    assert not np.array_equal(np.asarray(img), stored)


@pytest.mark.parametrize("count", [0, -2])
def test_non_positive_num_images_is_a_clear_error(project, log, count):
    params = load_params()
    params["synthesize"]["num_images"] = count
    with pytest.raises(ProxytuneError, match=r"synthesize\.num_images must be at least 1"):
        synthesize.run(params, log)
    assert not Path("outputs/synthesize").exists()

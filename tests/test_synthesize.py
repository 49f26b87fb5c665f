"""Stage `synthesize`: batched proxies, a manifest from which every image regenerates exactly, DINO filtering,
resume after an interruption, and several processes sharing the work through accelerate."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line, edit_params, paths
from diffusers import EulerDiscreteScheduler
from PIL import Image

from orchestration.cache import checkpoint_dir
from proxytune.io import read_jsonl
from proxytune.params import ProxytuneError, load_params
from proxytune.prompts import (
    ACCESSORIES,
    EVAL_PROMPTS,
    PROPERTIES,
    PROXY_BANK,
    RECONTEXT,
    proxy_prompts,
    with_token,
)
from tasks import synthesize

KINDS = {"recontext": RECONTEXT, "accessory": ACCESSORIES, "property": PROPERTIES}


def out_dir(root: Path) -> Path:
    """Where synthesize publishes its proxies in the test folder `root`."""
    return paths(root, "synthesize")["out"]


def kind_of(prompt: str, phrase: str = "sks toy", user: tuple = ()) -> str:
    kinds = {**KINDS, "user": list(user)}
    (kind,) = [k for k, templates in kinds.items() if prompt in {t.format(phrase) for t in templates}]
    return kind


def published(out: Path) -> tuple[bytes, dict[str, bytes]]:
    """The manifest's bytes and every published image's bytes."""
    return (out / "manifest.jsonl").read_bytes(), {p.name: p.read_bytes() for p in (out / "images").iterdir()}


def test_proxy_prompts_mix_kinds_and_cover_the_bank():
    bank_size = len(PROXY_BANK)
    for n in range(3, 2 * bank_size + 1):
        assert {kind_of(p) for p in proxy_prompts("sks toy", n)} == set(KINDS), n
    one_cycle = proxy_prompts("sks toy", bank_size)
    assert sorted(one_cycle) == sorted(t.format("sks toy") for t in PROXY_BANK)
    assert proxy_prompts("sks toy", 2 * bank_size) == one_cycle * 2  # cyclic
    assert not set(PROXY_BANK) & set(EVAL_PROMPTS), "evaluation prompts must stay unseen"
    user = ("a {} playing guitar", "a {} in space")
    mixed = proxy_prompts("sks toy", bank_size + len(user), user)
    assert sorted(mixed) == sorted(t.format("sks toy") for t in PROXY_BANK + list(user))
    first_user = [kind_of(p, user=user) for p in mixed].index("user")
    assert first_user < bank_size // 2, "user prompts are spread through the cycle, not appended"


def test_the_supervisor_reads_the_identifier_as_its_learned_token():
    assert with_token("a sks toy on the beach", "sks", "<sks>") == "a <sks> toy on the beach"
    assert with_token("sks toy, a sks", "sks", "<sks>") == "<sks> toy, a <sks>"
    assert with_token("a <sks> toy", "sks", "<sks>") == "a <sks> toy"  # already in the supervisor's form
    assert with_token("a sksy toy", "sks", "<sks>") == "a sksy toy"  # only the whole word
    assert with_token("a sks toy", "sks", None) == "a sks toy"  # LoRA alone: no learned token


def test_run_writes_images_and_manifest(synthesized):
    params = load_params(synthesized / "params.yaml")
    out = out_dir(synthesized)
    s = params["synthesize"]
    rows = read_jsonl(out / "manifest.jsonl")
    images = sorted((out / "images").glob("*.png"))
    assert len(rows) == len(images) == s["num_images"] >= 3
    assert [r["prompt"] for r in rows] == proxy_prompts("sks toy", s["num_images"])
    # params.yaml's supervisor learned pivotal tokens: it is asked with them, the student keeps the plain caption
    assert (out.parent / "supervise" / "embeddings.safetensors").is_file()
    assert [r["supervisor_prompt"] for r in rows] == proxy_prompts("<sks> toy", s["num_images"])
    assert [kind_of(r["prompt"]) for r in rows[:3]] == ["recontext", "accessory", "property"]
    assert len({r["seed"] for r in rows}) == len(rows) and all(isinstance(r["seed"], int) for r in rows)
    assert [(r["batch"], r["position"]) for r in rows] == [divmod(i, s["batch_size"]) for i in range(len(rows))]
    for r in rows:
        path = out / r["file"]
        assert path in images
        assert r["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert (r["steps"], r["guidance_scale"]) == (s["sample_steps"], s["guidance_scale"])
        assert r["scheduler"] == "DPMSolverMultistepScheduler"  # the class that sampled it: SD1.5's default
        assert r["dino"] is None  # min_dino: null, no scoring
        assert Image.open(path).size == (params["prepare"]["resolution"],) * 2
    assert read_jsonl(out / "dropped.jsonl") == []
    assert json.loads((out / "summary.json").read_text())["kept"] == len(rows)


def test_each_proxy_regenerates_exactly_from_its_row(synthesized):
    params = load_params(synthesized / "params.yaml")
    where = paths(synthesized, "synthesize")
    out = where["out"]
    rows = synthesize.proxy_rows(out)
    pipe = synthesize.load_supervisor(params, where["supervised"])
    for r in (rows[0], rows[-1]):
        stored = np.asarray(Image.open(out / r["file"]).convert("RGB"))
        assert np.array_equal(np.asarray(synthesize.regenerate(pipe, r, rows)), stored), r["file"]
    # the seed and the supervisor's LoRA really determine the pixels
    row = rows[1]
    stored = np.asarray(Image.open(out / row["file"]).convert("RGB"))
    reseeded = [{**r, "seed": r["seed"] + 1} for r in rows]
    assert not np.array_equal(np.asarray(synthesize.regenerate(pipe, reseeded[1], reseeded)), stored)
    dpm = pipe.scheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(dpm.config)
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler"):  # rows name the sampler they need
        synthesize.regenerate(pipe, row, rows)
    pipe.scheduler = dpm
    pipe.unload_lora_weights()
    assert not np.array_equal(np.asarray(synthesize.regenerate(pipe, row, rows)), stored)


RENDER_BATCH = synthesize.render_batch


class Interrupted(Exception):
    pass


def counting_render(monkeypatch, fail_at: int | None = None) -> list[int]:
    """Record which batches `render_batch` renders; raise on call number `fail_at` (1-based)."""
    calls = []

    def render_batch(pipe, rows):
        if len(calls) + 1 == fail_at:
            raise Interrupted
        calls.append(rows[0]["batch"])
        return RENDER_BATCH(pipe, rows)

    monkeypatch.setattr(synthesize, "render_batch", render_batch)
    return calls


def test_interrupted_synthesis_resumes_without_duplicates(synthesized, log, monkeypatch):
    params = load_params(synthesized / "params.yaml")
    params["synthesize"].update(num_images=5, batch_size=2, scheduler="euler")
    where = paths(synthesized, "synthesize")
    out = where["out"]
    work = checkpoint_dir("synthesize", params, where)
    synthesize.run(params, log, where)
    uninterrupted = published(out)
    assert not work.exists()  # cleared once published
    shutil.rmtree(out)

    calls = counting_render(monkeypatch, fail_at=3)
    with pytest.raises(Interrupted):
        synthesize.run(params, log, where)
    assert calls == [0, 1] and not out.exists()
    assert sorted(p.name for p in (work / "batches").iterdir()) == ["000000.jsonl", "000001.jsonl"]

    (work / "images" / "00001.png").write_bytes(b"torn")  # a damaged image of a finished batch is redone
    calls = counting_render(monkeypatch)
    synthesize.run(params, log, where)
    assert calls == [0, 2]
    assert published(out) == uninterrupted
    rows = read_jsonl(out / "manifest.jsonl")
    assert [r["index"] for r in rows] == list(range(5)) and len({r["file"] for r in rows}) == 5
    assert {r["scheduler"] for r in rows} == {"EulerDiscreteScheduler"}
    assert not work.exists()


def test_dino_filter_drops_low_scores_and_reports_counts(synthesized, log):
    params = load_params(synthesized / "params.yaml")
    where = paths(synthesized, "synthesize")
    out = where["out"]
    params["synthesize"]["min_dino"] = -1.0  # scores everything, keeps everything
    synthesize.run(params, log, where)
    scores = [r["dino"] for r in read_jsonl(out / "manifest.jsonl")]
    assert len(scores) == 4 and all(-1 <= s <= 1 for s in scores) and len(set(scores)) > 1
    threshold = sorted(scores)[2]  # keeps the best two

    params["synthesize"]["min_dino"] = threshold
    log.logged.clear()
    synthesize.run(params, log, where)
    kept, dropped = read_jsonl(out / "manifest.jsonl"), read_jsonl(out / "dropped.jsonl")
    assert sorted(r["dino"] for r in kept) == sorted(scores)[2:]
    assert sorted(r["dino"] for r in dropped) == sorted(scores)[:2]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(Path(r["file"]).name for r in kept)
    assert all("file" not in r for r in dropped)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rendered"], summary["kept"], summary["dropped"]) == (4, 2, 2)
    assert summary["mean_dino_kept"] == pytest.approx(sum(sorted(scores)[2:]) / 2)
    assert log.logged == [({"num_proxies": 2, "num_dropped": 2}, None)]

    params["synthesize"]["min_dino"] = 1.5
    with pytest.raises(ProxytuneError) as err:
        synthesize.run(params, log, where)
    assert_one_line(err, "synthesize.min_dino", "drops all 4")
    assert len(read_jsonl(out / "manifest.jsonl")) == 2  # the published set is untouched


@pytest.mark.parametrize("name, value, rule", [
    ("num_images", 0, "synthesize.num_images = 0: must be >= 1"),
    ("batch_size", -2, "synthesize.batch_size = -2: must be >= 1"),
    ("sample_steps", 0, "synthesize.sample_steps = 0: must be >= 1"),
    ("scheduler", "EulerDiscreteScheduler", "synthesize.scheduler = 'EulerDiscreteScheduler': must be 'dpm\\+\\+'"),
    ("num_images", "many", "synthesize.num_images = 'many': must be a whole number"),
    ("min_dino", "high", "synthesize.min_dino = 'high': must be a number"),
    ("user_prompts", "a {} dancing", "synthesize.user_prompts = 'a {} dancing': must be a list"),
    ("user_prompts", ["a {} dancing", "a sks toy singing"], r"synthesize.user_prompts\[1\] = .* exactly one '{}'"),
])
def test_bad_params_are_one_line_errors(project, name, value, rule):
    edit_params(project, "synthesize", **{name: value})
    with pytest.raises(ProxytuneError, match=rule) as err:
        load_params(project / "params.yaml")
    assert_one_line(err, f"synthesize.{name}")

"""Stage `distill`: cached tokenisation, the peft adapter and its card, mixed precision."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line
from PIL import Image
from safetensors import safe_open

import ar_models
from ar_models.llamagen import LlamaGenStudent
from proxytune.images import to_tensor
from proxytune.io import read_jsonl, sha256_file
from proxytune.params import ProxytuneError, load_params
from proxytune.tuning import load_tuned
from tasks import distill
from tasks.distill import tokenise_cached

MANIFEST = Path("outputs/synthesize/manifest.jsonl")


def proxy_files() -> list[Path]:
    return [MANIFEST.parent / r["file"] for r in read_jsonl(MANIFEST)]


def count_encodes(student) -> list[int]:
    """Wrap `student.encode_images` so each call records how many images it encoded."""
    calls, original = [], student.encode_images

    def encode_images(images):
        calls.append(len(images))
        return original(images)

    student.encode_images = encode_images
    return calls


def test_tokenise_cached_reuses_codes(synthesized):
    params = load_params()
    student = ar_models.load_student(params["student"])
    calls = count_encodes(student)
    files, vq = proxy_files(), params["student"]["vq_checkpoint"]

    first = tokenise_cached(student, files, vq)
    assert sum(calls) == len(files)
    assert first.shape == (len(files), student.gpt.config.block_size) and first.dtype == torch.long
    with torch.no_grad():
        direct = student.vq.encode(to_tensor([Image.open(f) for f in files]))
    assert torch.equal(first, direct)

    calls.clear()
    again = tokenise_cached(student, files, vq)
    assert calls == [] and torch.equal(again, first)

    # keyed by content: a renamed copy is a hit, one changed image is the only one encoded
    copy = Path("renamed.png")
    shutil.copy(files[0], copy)
    changed = Path("changed.png")
    img = Image.open(files[1]).convert("RGB")
    img.putpixel((0, 0), tuple(255 - c for c in img.getpixel((0, 0))))
    img.save(changed)
    mixed = tokenise_cached(student, [copy, changed, *files], vq)
    assert calls == [1]
    assert torch.equal(mixed[0], first[0]) and torch.equal(mixed[2:], first)


def test_run_writes_adapter_card_and_loss_that_reload(synthesized, log):
    params = load_params()
    s = params["student"]
    s["learning_rate"] = 5e-2  # large, so the adapter visibly moves the logits in a few steps
    result = distill.run(params, log)

    out = Path("outputs/distill")
    adapter = out / "adapter"
    assert result["files"] == ["adapter"] and Path(result["out_dir"]) == out
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == s["lora_rank"] and config["lora_alpha"] == s["lora_alpha"]
    card = json.loads((out / "card.json").read_text())
    assert card["method"] == "proxy_tuning" and card["family"] == s["family"] and card["files"] == ["adapter"]
    assert card["base"] == {k: s[k] for k in ("family", "size", "vq_size", "checkpoint", "vq_checkpoint",
                                              "text_encoder", "image_size")}
    assert card["data"]["manifest_sha256"] == [sha256_file(MANIFEST)]
    assert card["data"]["num_images"] == len(read_jsonl(MANIFEST)) and card["data"]["identifier"] == "sks"

    with open("outputs/distill_loss.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, int(s["steps"]) + 1))
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    # the same Python float, in JSON and in the CSV, both written with repr (which round-trips): exactly equal
    assert card["final_loss"] == float(rows[-1]["loss"])

    # reloaded onto a fresh base model, the adapter changes its logits
    tuned, base = load_tuned(out, s), ar_models.load_student(s)
    rows = read_jsonl(MANIFEST)
    codes = tokenise_cached(base, proxy_files()[:2], s["vq_checkpoint"])
    with torch.no_grad():
        prompts = [r["prompt"] for r in rows[:2]]
        delta = tuned.student.logits(tuned.condition(prompts), codes) - base.logits(base.encode_prompts(prompts), codes)
    assert delta.abs().max() > 1e-2


@pytest.mark.parametrize("method", ["two_stage", "arbooth"])
def test_each_method_runs_as_the_stage_and_reloads(synthesized, log, method):
    params = load_params()
    s = params["student"]
    s.update(method=method, data="references", steps=2)
    s["two_stage"]["embedding_steps"] = 2
    s["arbooth"]["prior_images"] = 2
    result = distill.run(params, log)
    card = json.loads(Path("outputs/distill/card.json").read_text())
    assert card["method"] == method and card["data"]["num_images"] == 4  # the four prepared references
    assert result["files"] == (["identifiers.safetensors", "adapter"] if method == "two_stage"
                               else ["identifiers.safetensors", "tuned_weights.safetensors"])
    images = load_tuned("outputs/distill", s).generate(["a sks toy on the beach"], seed=0)
    assert images.shape == (1, 3, s["image_size"], s["image_size"])
    if method == "arbooth":  # the prior samples are rendered once and then reused
        prior = list((Path(".proxytune/cache/prior")).glob("*/*.png"))
        assert len(prior) == 2
        mtimes = [p.stat().st_mtime_ns for p in prior]
        distill.run(params, log)
        assert [p.stat().st_mtime_ns for p in prior] == mtimes


def test_embedding_only_two_stage_trains_just_the_identifier(synthesized, log):
    """Sun et al.'s stage-1-only baseline: `stage2: none` runs embedding_steps and saves only the embeddings."""
    params = load_params()
    s = params["student"]
    s.update(method="two_stage", data="references", steps=5)
    s["two_stage"].update(stage2="none", embedding_steps=3)
    result = distill.run(params, log)
    assert result["files"] == ["identifiers.safetensors"]
    with open("outputs/distill_loss.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3  # student.steps is ignored
    base, tuned = ar_models.load_student(s), load_tuned("outputs/distill", s)
    tuned_gpt = dict(tuned.student.gpt.named_parameters())
    assert all(torch.equal(p, tuned_gpt[n]) for n, p in base.gpt.named_parameters())
    assert tuned.student.text_embedding.num_embeddings > base.text_embedding.num_embeddings


def test_augmented_references_and_extra_subjects(synthesized, log):
    params = load_params()
    s = params["student"]
    s.update(data="augmented_references", augment_copies=3, steps=1)
    distill.run(params, log)
    card = json.loads(Path("outputs/distill/card.json").read_text())
    assert card["data"]["num_images"] == 4 * 3
    augmented = sorted(Path(".proxytune/cache/augmented").glob("*/*.png"))
    assert len(augmented) == 12 and len({sha256_file(p) for p in augmented}) == 12  # each copy differs

    shutil.copytree("outputs/synthesize", "other_subject")
    s.update(data="proxies", extra_subjects=["other_subject"])
    distill.run(params, log)
    card = json.loads(Path("outputs/distill/card.json").read_text())
    assert card["data"]["num_images"] == 2 * len(read_jsonl(MANIFEST))

    s["extra_subjects"] = ["nowhere"]
    with pytest.raises(ProxytuneError) as err:
        distill.run(params, log)
    assert_one_line(err, "nowhere/manifest.jsonl", "student.extra_subjects")


@pytest.mark.parametrize("key, value, rule", [
    ("method", "dreambooth", "student.method must be one of"),
    ("data", "web", "student.data must be one of"),
    ("grad_accum", 0, "student.grad_accum must be a positive integer"),
])
def test_bad_tuning_params_are_one_line_errors(synthesized, log, key, value, rule):
    params = load_params()
    params["student"][key] = value
    with pytest.raises(ProxytuneError) as err:
        distill.run(params, log)
    assert_one_line(err, rule)
    assert not Path("outputs/distill").exists()


def test_bf16_trains_with_finite_loss(synthesized, log, monkeypatch):
    params = load_params()
    params["student"]["mixed_precision"] = "bf16"
    seen = []  # (autocast on?, its dtype) inside every student.loss call made while training
    loss = LlamaGenStudent.loss

    def spy(self, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(LlamaGenStudent, "loss", spy)
    distill.run(params, log)

    assert seen and all(s == (True, torch.bfloat16) for s in seen)
    with open("outputs/distill_loss.csv", newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(losses) == int(params["student"]["steps"]) and all(math.isfinite(v) for v in losses)
    with safe_open("outputs/distill/adapter/adapter_model.safetensors", "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.float32}  # autocast computes in bf16, the LoRA weights stay fp32


@pytest.mark.parametrize("value", ["fp16", "bf 16", False])
def test_invalid_mixed_precision_is_a_clear_error(project, log, value):
    params = load_params()
    params["student"]["mixed_precision"] = value
    with pytest.raises(ProxytuneError, match=r"student\.mixed_precision must be .*'bf16'"):
        distill.run(params, log)
    assert not Path("outputs/distill").exists()

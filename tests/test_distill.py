"""Stage `distill`: cached tokenisation, the peft adapter and its card, mixed precision."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line, edit_params, paths
from PIL import Image
from safetensors import safe_open

import ar_models
from ar_models.llamagen import LlamaGenStudent
from proxytune.images import to_tensor
from proxytune.io import cache_dir, read_jsonl, sha256_file
from proxytune.params import ProxytuneError, load_params
from proxytune.tuning import load_tuned
from tasks import distill
from tasks.distill import tokenise_cached


def manifest(root: Path) -> Path:
    """The proxy manifest synthesize wrote in the test folder `root`."""
    return paths(root, "distill")["proxies"] / "manifest.jsonl"


def proxy_files(root: Path) -> list[Path]:
    return [manifest(root).parent / r["file"] for r in read_jsonl(manifest(root))]


def count_encodes(student) -> list[int]:
    """Wrap `student.encode_images` so each call records how many images it encoded."""
    calls, original = [], student.encode_images

    def encode_images(images):
        calls.append(len(images))
        return original(images)

    student.encode_images = encode_images
    return calls


def test_tokenise_cached_reuses_codes(synthesized):
    params = load_params(synthesized / "params.yaml")
    student = ar_models.load_student(params["student"])
    calls = count_encodes(student)
    files, vq = proxy_files(synthesized), params["student"]["vq_checkpoint"]

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
    copy = synthesized / "renamed.png"
    shutil.copy(files[0], copy)
    changed = synthesized / "changed.png"
    img = Image.open(files[1]).convert("RGB")
    img.putpixel((0, 0), tuple(255 - c for c in img.getpixel((0, 0))))
    img.save(changed)
    mixed = tokenise_cached(student, [copy, changed, *files], vq)
    assert calls == [1]
    assert torch.equal(mixed[0], first[0]) and torch.equal(mixed[2:], first)


def test_run_writes_adapter_card_and_loss_that_reload(synthesized, log):
    params = load_params(synthesized / "params.yaml")
    s = params["student"]
    s["learning_rate"] = 5e-2  # large, so the adapter visibly moves the logits in a few steps
    result = distill.run(params, log, paths(synthesized, "distill"))

    out = synthesized / "outputs/distill"
    adapter = out / "adapter"
    assert result["files"] == ["adapter"] and Path(result["out_dir"]) == out
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == s["lora_rank"] and config["lora_alpha"] == s["lora_alpha"]
    card = json.loads((out / "card.json").read_text())
    assert card["method"] == "proxy_tuning" and card["family"] == s["family"] and card["files"] == ["adapter"]
    assert card["base"] == {k: s[k] for k in ("family", "size", "vq_size", "checkpoint", "vq_checkpoint",
                                              "text_encoder", "image_size")}
    assert card["data"]["manifest_sha256"] == [sha256_file(manifest(synthesized))]
    assert card["data"]["num_images"] == len(read_jsonl(manifest(synthesized))) and card["data"]["identifier"] == "sks"

    with open(synthesized / "outputs/distill_loss.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, int(s["steps"]) + 1))
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    # the same Python float, in JSON and in the CSV, both written with repr (which round-trips): exactly equal
    assert card["final_loss"] == float(rows[-1]["loss"])

    # reloaded onto a fresh base model, the adapter changes its logits
    tuned, base = load_tuned(out, s), ar_models.load_student(s)
    rows = read_jsonl(manifest(synthesized))
    codes = tokenise_cached(base, proxy_files(synthesized)[:2], s["vq_checkpoint"])
    with torch.no_grad():
        prompts = [r["prompt"] for r in rows[:2]]
        delta = tuned.student.logits(tuned.condition(prompts), codes) - base.logits(base.encode_prompts(prompts), codes)
    assert delta.abs().max() > 1e-2


@pytest.mark.parametrize("method", ["two_stage", "arbooth"])
def test_each_method_runs_as_the_stage_and_reloads(synthesized, log, method):
    params = load_params(synthesized / "params.yaml")
    s = params["student"]
    s.update(method=method, data="references", steps=2)
    s["two_stage"]["embedding_steps"] = 2
    s["arbooth"]["prior_images"] = 2
    result = distill.run(params, log, paths(synthesized, "distill"))
    card = json.loads((synthesized / "outputs/distill/card.json").read_text())
    assert card["method"] == method and card["data"]["num_images"] == 4  # the four prepared references
    assert result["files"] == (["identifiers.safetensors", "adapter"] if method == "two_stage"
                               else ["identifiers.safetensors", "tuned_weights.safetensors"])
    images = load_tuned(synthesized / "outputs/distill", s).generate(["a sks toy on the beach"], seed=0)
    assert images.shape == (1, 3, s["image_size"], s["image_size"])
    if method == "arbooth":  # the prior samples are rendered once and then reused
        prior = list(cache_dir("prior").glob("*/*.png"))  # $PROXYTUNE_CACHE: inside the test folder
        assert len(prior) == 2
        mtimes = [p.stat().st_mtime_ns for p in prior]
        distill.run(params, log, paths(synthesized, "distill"))
        assert [p.stat().st_mtime_ns for p in prior] == mtimes


def test_embedding_only_two_stage_trains_just_the_identifier(synthesized, log):
    """Sun et al.'s stage-1-only baseline: `stage2: none` runs embedding_steps and saves only the embeddings."""
    params = load_params(synthesized / "params.yaml")
    s = params["student"]
    s.update(method="two_stage", data="references", steps=5)
    s["two_stage"].update(stage2="none", embedding_steps=3)
    result = distill.run(params, log, paths(synthesized, "distill"))
    assert result["files"] == ["identifiers.safetensors"]
    with open(synthesized / "outputs/distill_loss.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3  # student.steps is ignored
    base, tuned = ar_models.load_student(s), load_tuned(synthesized / "outputs/distill", s)
    tuned_gpt = dict(tuned.student.gpt.named_parameters())
    assert all(torch.equal(p, tuned_gpt[n]) for n, p in base.gpt.named_parameters())
    assert tuned.student.text_embedding.num_embeddings > base.text_embedding.num_embeddings


def test_augmented_references_and_extra_subjects(synthesized, log):
    params = load_params(synthesized / "params.yaml")
    where = paths(synthesized, "distill")
    s = params["student"]
    s.update(data="augmented_references", augment_copies=3, steps=1)
    distill.run(params, log, where)
    card = json.loads((where["out"] / "card.json").read_text())
    assert card["data"]["num_images"] == 4 * 3
    augmented = sorted(cache_dir("augmented").glob("*/*.png"))  # $PROXYTUNE_CACHE: inside the test folder
    assert len(augmented) == 12 and len({sha256_file(p) for p in augmented}) == 12  # each copy differs

    other = synthesized / "other_subject"
    shutil.copytree(where["proxies"], other)
    s.update(data="proxies", extra_subjects=[str(other)])
    distill.run(params, log, where)
    card = json.loads((where["out"] / "card.json").read_text())
    assert card["data"]["num_images"] == 2 * len(read_jsonl(manifest(synthesized)))

    nowhere = synthesized / "nowhere"
    s["extra_subjects"] = [str(nowhere)]
    with pytest.raises(ProxytuneError) as err:
        distill.run(params, log, where)
    assert_one_line(err, str(nowhere / "manifest.jsonl"), "student.extra_subjects")


@pytest.mark.parametrize("key, value, rule", [
    ("method", "dreambooth", "student.method = 'dreambooth': must be 'proxy_tuning', 'two_stage' or 'arbooth'"),
    ("data", "web", "student.data = 'web': must be 'proxies', "),
    ("grad_accum", 0, "student.grad_accum = 0: must be >= 1"),
])
def test_bad_tuning_params_are_one_line_errors(synthesized, key, value, rule):
    edit_params(synthesized, "student", **{key: value})
    with pytest.raises(ProxytuneError) as err:
        load_params(synthesized / "params.yaml")
    assert_one_line(err, rule)


def test_bf16_trains_with_finite_loss(synthesized, log, monkeypatch):
    params = load_params(synthesized / "params.yaml")
    params["student"]["mixed_precision"] = "bf16"
    seen = []  # (autocast on?, its dtype) inside every student.loss call made while training
    loss = LlamaGenStudent.loss

    def spy(self, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(LlamaGenStudent, "loss", spy)
    distill.run(params, log, paths(synthesized, "distill"))

    assert seen and all(s == (True, torch.bfloat16) for s in seen)
    with open(synthesized / "outputs/distill_loss.csv", newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(losses) == int(params["student"]["steps"]) and all(math.isfinite(v) for v in losses)
    with safe_open(str(synthesized / "outputs/distill/adapter/adapter_model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.float32}  # autocast computes in bf16, the LoRA weights stay fp32


@pytest.mark.parametrize("value", ["fp16", "bf 16", False])
def test_invalid_mixed_precision_is_a_clear_error(project, value):
    edit_params(project, "student", mixed_precision=value)
    with pytest.raises(ProxytuneError, match=r"student\.mixed_precision = .*: must be 'fp32' or 'bf16'"):
        load_params(project / "params.yaml")

"""Stage `distill`: cached tokenisation, the peft adapter and its card, mixed precision."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import ar_models
from ar_models.llamagen import LlamaGenStudent
from proxytune.images import to_tensor
from proxytune.io import read_jsonl, sha256_file
from proxytune.params import ProxytuneError, load_params
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


def capture_students(monkeypatch) -> list:
    """Keep the student `distill.run` loads, so tests can look at the trained in-memory model."""
    students, original = [], ar_models.load_student

    def load_student(section):
        students.append(original(section))
        return students[-1]

    monkeypatch.setattr(distill, "load_student", load_student)
    return students


def logits(gpt, cond, codes) -> torch.Tensor:
    gpt.eval()
    with torch.no_grad():
        return gpt(codes[:, :-1], cond.features, cond.mask)


def test_run_writes_adapter_card_and_loss_that_reload(synthesized, log, monkeypatch):
    params = load_params()
    s = params["student"]
    s["learning_rate"] = 5e-2  # large, so the adapter visibly moves the logits in a few steps
    trained = capture_students(monkeypatch)
    result = distill.run(params, log)

    out = Path("outputs/distill")
    adapter = out / "adapter"
    assert Path(result["adapter_dir"]) == adapter
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == s["lora_rank"] and config["lora_alpha"] == s["lora_alpha"]
    card = json.loads((out / "card.json").read_text())
    assert card["method"] == "proxy-tuning" and card["family"] == s["family"]
    assert card["base"] == {k: s[k] for k in ("size", "vq_size", "checkpoint", "vq_checkpoint", "text_encoder")}
    assert card["data"] == {"manifest_sha256": sha256_file(MANIFEST), "num_images": len(read_jsonl(MANIFEST))}

    with open("outputs/distill_loss.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, int(s["steps"]) + 1))
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert card["final_loss"] == pytest.approx(float(rows[-1]["loss"]), rel=1e-4)

    # reload onto a fresh student: differs from the base, equals the model that was trained
    from peft import PeftModel

    fresh = ar_models.load_student(s)
    rows = read_jsonl(MANIFEST)
    cond = fresh.encode_prompts([r["prompt"] for r in rows[:2]])
    codes = tokenise_cached(fresh, proxy_files()[:2], s["vq_checkpoint"])
    base = logits(fresh.gpt, cond, codes)
    loaded = PeftModel.from_pretrained(fresh.gpt, str(adapter))
    reloaded = logits(loaded, cond, codes)
    (student,) = trained
    in_memory = logits(student.gpt, cond, codes)
    assert (reloaded - base).abs().max() > 1e-2
    torch.testing.assert_close(reloaded, in_memory, atol=1e-5, rtol=1e-5)


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

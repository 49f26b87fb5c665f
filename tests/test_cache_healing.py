"""Caches that heal: a torn entry of any content-addressed cache is named in the log, deleted and recomputed, and
the run ends as one with an intact cache would."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import paths
from PIL import Image

import ar_models
from orchestration.cache import outputs_current, stage_key, write_stamp
from proxytune.dreambooth import DreamBoothConfig, DreamBoothLoRA
from proxytune.io import cache_dir, read_jsonl
from proxytune.metrics import DinoEmbedder, EmbeddingCache
from proxytune.params import load_params
from proxytune.training import Checkpointer
from tasks.distill import augmented_references, prior_samples, tokenise_cached
from testbed.tiny_evaluators import build_tiny_evaluators


def truncate(path: Path) -> None:
    """What a disk fault or a writer killed without an atomic rename leaves: the first half of the bytes."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def assert_healed(caplog, path: Path) -> None:
    """The log names the bad entry (one line), and the entry on disk is whole again."""
    lines = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], caplog.text
    assert lines[0].startswith(f"cache entry {path} is unreadable (") and lines[0].endswith("); recomputing")


@pytest.fixture(autouse=True)
def _log_warnings(caplog):
    caplog.set_level(logging.WARNING, logger="proxytune")


def test_class_images(synthesized, caplog):
    instance = sorted((paths(synthesized, "prepare")["out"] / "instance").glob("*.png"))
    cfg = DreamBoothConfig(model="models/world/supervisor", instance_images=instance,
                           instance_prompt="a photo of sks toy", class_prompt="a photo of toy", steps=1,
                           num_class_images=2, class_batch_size=2, sample_steps=2, seed=0)
    first = DreamBoothLoRA(cfg)
    first.setup()
    bad = sorted(cache_dir("class_images").glob("*/*.png"))[1]
    truncate(bad)

    again = DreamBoothLoRA(cfg)
    again.setup()
    assert_healed(caplog, bad)
    assert again.class_images_rendered == 1
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(again.class_images, first.class_images))
    assert np.array_equal(np.asarray(Image.open(bad).convert("RGB")), np.asarray(first.class_images[1]))


@pytest.fixture
def student_setup(synthesized):
    params = load_params(synthesized / "params.yaml")
    return params, ar_models.load_student(params["student"])


def test_token_codes(synthesized, student_setup, caplog):
    params, student = student_setup
    vq = params["student"]["vq_checkpoint"]
    proxies = paths(synthesized, "distill")["proxies"]
    files = [proxies / r["file"] for r in read_jsonl(proxies / "manifest.jsonl")][:3]
    first = tokenise_cached(student, files, vq)
    bad = sorted(cache_dir("codes").glob("*/*.safetensors"))[0]
    truncate(bad)

    again = tokenise_cached(student, files, vq)
    assert_healed(caplog, bad)
    assert torch.equal(again, first)
    assert torch.equal(tokenise_cached(student, files, vq), first)  # read back from the healed entry


def test_prior_samples(student_setup, caplog):
    params, student = student_setup
    s = params["student"]
    s["arbooth"]["prior_images"] = 2
    files = prior_samples(student, s, "a photo of toy", seed=0)
    before = [f.read_bytes() for f in files]
    truncate(files[0])

    assert prior_samples(student, s, "a photo of toy", seed=0) == files
    assert_healed(caplog, files[0])
    assert [f.read_bytes() for f in files] == before


def test_augmented_references(synthesized, caplog):
    prepared = paths(synthesized, "distill")["prepared"]
    rows = read_jsonl(prepared / "captions.jsonl")[:2]
    pairs = augmented_references(prepared, rows, copies=2, seed=0)
    before = [p.read_bytes() for p, _ in pairs]
    bad = pairs[2][0]
    truncate(bad)

    assert augmented_references(prepared, rows, copies=2, seed=0) == pairs
    assert_healed(caplog, bad)
    assert [p.read_bytes() for p, _ in pairs] == before


def test_embeddings(tmp_path, caplog):
    dino = build_tiny_evaluators(tmp_path / "evaluators", seed=0)["dino"]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(2)]
    first = DinoEmbedder(dino, cache=EmbeddingCache(tmp_path / "cache")).embed_images(images)
    bad = sorted((tmp_path / "cache").rglob("*.safetensors"))[0]
    truncate(bad)

    again = DinoEmbedder(dino, cache=EmbeddingCache(tmp_path / "cache"))
    assert torch.equal(again.embed_images(images), first)
    assert_healed(caplog, bad)
    assert (again.cache.hits, again.cache.misses) == (1, 1)


def test_training_checkpoint(tmp_path, caplog):
    checkpoints = Checkpointer(tmp_path / "ckpt", every=2)
    checkpoints.save(2, {"step": 2, "weights": torch.arange(1000.0)})
    bad = tmp_path / "ckpt" / "step-0000002.pt"
    truncate(bad)

    assert checkpoints.latest() is None  # the run starts over rather than crashing
    message = next(r.getMessage() for r in caplog.records if str(bad) in r.getMessage())
    assert message.startswith(f"checkpoint {bad} is unreadable (") and not bad.exists()


def test_stage_stamp(synthesized, caplog):
    params = load_params(synthesized / "params.yaml")
    where = paths(synthesized, "supervise")
    key = stage_key("supervise", params, where)
    write_stamp("supervise", key, where)
    assert outputs_current("supervise", key, where)
    stamp = next(cache_dir("stamps").glob("supervise-*.json"))
    assert json.loads(stamp.read_text())["key"] == key
    truncate(stamp)

    assert not outputs_current("supervise", key, where)  # unknown: the stage runs again and stamps anew
    assert_healed(caplog, stamp)

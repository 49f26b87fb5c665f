"""Our samplers, scores and supervisor step give what the peer implementations in bench/peers.py give on the
same weights: the precondition of every peer row of bench/peers_bench.py (which times them)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bench import peers
from proxytune.prompts import corpus_words

PROMPTS = ["a sks dog on the beach", "a dog", "a sks toy in the snow with a red hat", "cat"]


@pytest.mark.parametrize("batch", [1, 4])
def test_janus_sampler_matches_transformers_image_generation(tmp_path, batch):
    from ar_models.janus_pro import JanusProStudent
    from testbed.tiny_students import build_tiny_janus_pro

    student = JanusProStudent.from_paths(build_tiny_janus_pro(tmp_path, corpus_words())["checkpoint"], "tiny", 32)
    cond = student.encode_prompts(PROMPTS[:batch])
    ours = student.sample_tokens(cond, cfg_scale=5.0, seed=3)
    assert torch.equal(ours, peers.janus_generate(student, PROMPTS[:batch], 5.0, seed=3))


@pytest.mark.parametrize("batch", [1, 4])
def test_lumina_sampler_matches_chameleon_generate(batch):
    from ar_models.lumina_mgpt import LuminaMGPTStudent
    from testbed.tiny_students import tiny_lumina_mgpt_components

    student = LuminaMGPTStudent(*tiny_lumina_mgpt_components(corpus_words(), 0, 64), image_size=64)
    image_tokens = list(student.decoder.model.vocabulary_mapping.image_tokens)
    ours = student.sample_tokens(student.encode_prompts(PROMPTS[:batch]), cfg_scale=3.0, top_k=1, seed=0)
    assert torch.equal(ours, peers.chameleon_generate(student, PROMPTS[:batch], 3.0))
    assert list(student.decoder.model.vocabulary_mapping.image_tokens) == image_tokens  # the mask is restored


def test_scores_match_a_per_image_loop(tmp_path):
    from proxytune.metrics import ClipEmbedder, DinoEmbedder, prompt_scores
    from testbed.tiny_evaluators import build_tiny_evaluators

    tiny = build_tiny_evaluators(tmp_path)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)) for _ in range(9)]
    prompts = [PROMPTS[i % 3] for i in range(6)]
    ours = prompt_scores(images[:6], prompts, images[6:], DinoEmbedder(tiny["dino"]),
                         ClipEmbedder(tiny["clip_model_name"], tiny["clip_pretrained"],
                                      config_dir=tiny["clip_config_dir"]))
    scorer = peers.PerImageScorer(tiny["dino"], tiny["clip_model_name"], tiny["clip_pretrained"],
                                  tiny["clip_config_dir"])
    theirs = scorer.scores(images[:6], prompts, images[6:])
    for a, b in zip(ours, theirs, strict=True):
        assert a["prompt"] == b["prompt"] and a["images"] == b["images"]
        for key in ("dino", "clip_i", "clip_t"):
            assert a[key] == pytest.approx(b[key], abs=1e-5)


def test_supervisor_step_matches_the_dreambooth_script(tmp_path, monkeypatch):
    from bench.peers_bench import supervisor_pair
    from testbed.tiny_supervisors import build_tiny_supervisor

    monkeypatch.setenv("PROXYTUNE_CACHE", str(tmp_path / "cache"))
    model = build_tiny_supervisor(tmp_path / "sd", corpus_words(), seed=0, image_size=32)
    rng = np.random.default_rng(0)
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(files[-1])
    ours, script = supervisor_pair(str(model), files)
    for _ in range(2):  # the second step also checks the optimizer steps agree
        assert ours.train_step()["loss"] == pytest.approx(script.train_step(), rel=1e-5)

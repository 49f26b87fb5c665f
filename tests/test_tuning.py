"""The three tuning recipes on the tiny LlamaGen: exactly the specified weights move, losses fall, prior
distillation is zero against itself, resume is exact, and saved artifacts regenerate the same image."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, RecordingLogger
from safetensors.torch import load_file
from tolerances import reduction_tol

from ar_models import PromptBatch, load_student
from ar_models.base import insert_prefix
from proxytune.params import load_params
from proxytune.training import Checkpointer, train
from proxytune.tuning import (
    ADAPTER_DIR,
    IDENTIFIERS_FILE,
    TUNED_WEIGHTS_FILE,
    TuneConfig,
    TunedStudent,
    TuningData,
    build_recipe,
    load_tuned,
    write_card,
)

PROMPTS = ["a sks toy on the beach", "a sks toy in the snow", "a red sks toy", "a sks toy wearing a red hat"]


FAMILIES = ["llamagen", "lumina_mgpt", "janus_pro", "var", "infinity"]


def family_params(built_models: Path, family: str) -> dict:
    """The params `student` section for a family's tiny replica (its preset), with absolute paths."""
    s = copy.deepcopy(load_params(built_models / "params.yaml")["student"])
    s.update(yaml.safe_load((REPO / "presets" / f"student_{family}_tiny.yaml").read_text())["student"])
    for key in ("checkpoint", "vq_checkpoint", "vq_config", "text_encoder", "tokenizer"):
        if key in s and str(s[key]).startswith("models/"):
            s[key] = str(built_models / s[key])
    return s


@pytest.fixture(scope="module")
def student_params(built_models) -> dict:
    return family_params(built_models, "llamagen")


@pytest.fixture(scope="module", params=FAMILIES)
def any_family(request, built_models) -> dict:
    return family_params(built_models, request.param)


def make_data(student, with_prior: bool = False) -> TuningData:
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, student.image_size, student.image_size, generator=g) * 2 - 1
    codes = student.encode_images(images)
    data = TuningData(codes=codes, prompts=PROMPTS, identifier="sks", class_noun="toy")
    if with_prior:
        data.prior_prompt = "a photo of toy"
        data.prior_codes = student.encode_images(student.generate([data.prior_prompt] * 3, cfg_scale=1.0, seed=5))
    return data


CONFIGS = {
    "proxy_tuning": TuneConfig(method="proxy_tuning", steps=6, batch_size=2, learning_rate=5e-2),
    "two_stage_lora": TuneConfig(method="two_stage", steps=3, embedding_steps=3, batch_size=2, learning_rate=5e-2,
                                 lora_every_nth_layer=2),
    "two_stage_qkv": TuneConfig(method="two_stage", steps=3, embedding_steps=3, batch_size=2, learning_rate=1e-2,
                                stage2="qkv"),
    "arbooth": TuneConfig(method="arbooth", steps=6, batch_size=2, learning_rate=1e-2, betas=(0.9, 0.97)),
}


def snapshot(student) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in student.named_parameters()}


def changed(before: dict, student) -> set[str]:
    after = dict(student.named_parameters())
    return {n for n, v in before.items() if not torch.equal(v, after[n].detach())}


def trained(student_params, name: str):
    student = load_student(student_params)
    cfg = copy.deepcopy(CONFIGS[name])
    recipe = build_recipe(student, cfg)
    recipe.setup(make_data(student, with_prior=cfg.method == "arbooth"))
    return student, recipe


@pytest.mark.parametrize("name", list(CONFIGS))
def test_exactly_the_specified_parameters_change(any_family, name):
    plain = load_student(any_family)
    groups = plain.parameter_groups()
    qkv_every_2nd = set(plain.module_names(["attn_qkv"], every_nth_layer=2))
    table = next(n for n, p in plain.named_parameters() if p is plain.text_embedding.weight)
    del plain

    student, recipe = trained(any_family, name)
    before = snapshot(student)
    cfg = recipe.cfg
    total = cfg.steps + (cfg.embedding_steps if cfg.method == "two_stage" else 0)
    stage1_changed = None
    for step in range(1, total + 1):
        recipe.train_step()
        if cfg.method == "two_stage" and step == cfg.embedding_steps:
            stage1_changed = changed(before, student)
    moved = changed(before, student)
    lora = {n for n in before if "lora_" in n}
    if name == "proxy_tuning":
        assert moved and moved <= lora
    if name.startswith("two_stage"):
        assert stage1_changed == {table}  # stage 1: the identifier embedding only
        rows = torch.zeros(before[table].shape[0], dtype=torch.bool)
        rows[recipe.token_ids] = True
        after = dict(student.named_parameters())[table].detach()
        assert torch.equal(after[~rows], before[table][~rows]) and not torch.equal(after[rows], before[table][rows])
        assert len(recipe.token_ids) == 1 + 4  # [V] and one S_i per reference
    if name == "two_stage_lora":
        assert {n.split(".lora_")[0] for n in lora} == qkv_every_2nd  # Q/K/V of every 2nd layer
        assert moved == {table, *lora}
    if name == "two_stage_qkv":
        assert moved == {table, *groups["attn_qkv"]}
    if name == "arbooth":
        assert moved == set(groups["mlp"]) | set(groups["cross_attn"])  # self-attention frozen
        assert recipe.trainable.prefix.abs().sum() > 0


def test_losses_fall(student_params):
    student, recipe = trained(student_params, "proxy_tuning")
    recipe.cfg.cond_dropout = 0.0
    losses = [recipe.train_step()["loss"] for _ in range(25)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1


def test_prior_distillation_is_zero_against_itself(student_params):
    student, recipe = trained(student_params, "arbooth")
    idx = torch.arange(len(recipe.data.prior_codes))
    # the teacher is a frozen copy: same weights, same kernels, same shapes, so its log-probabilities are the
    # student's bit for bit and every KL term is exactly 0
    assert recipe.distillation(idx).item() == 0.0
    recipe.train_step()
    losses = recipe.train_step()
    # grad_accum 1: the logged values are the float32 tensors; loss = subject + 0.5 * KL, redone in float32
    # (times 0.5 is exact, the sum one correctly rounded addition)
    assert recipe.cfg.grad_accum == 1 and recipe.cfg.prior_weight == 0.5
    assert losses["prior_kl"] > 0 and losses["loss"] == float(
        np.float32(losses["subject_loss"]) + np.float32(0.5) * np.float32(losses["prior_kl"]))


def test_token_weights_change_the_loss(student_params):
    student = load_student(student_params)
    data = make_data(student)
    cond = student.encode_prompts(PROMPTS)
    weights = torch.ones(data.codes.shape[1])
    uniform = student.loss(cond, data.codes, token_weights=weights)
    # same logits (same kernels and shapes); sum(w * ce) / sum(w) vs ce.mean(): two orders of one mean of
    # positive terms
    n_tokens = data.codes.numel()
    torch.testing.assert_close(uniform, student.loss(cond, data.codes), rtol=0,
                               atol=reduction_tol(torch.float32, n_tokens, uniform.item()))
    weights[:4] = 0.0
    logits = student.logits(cond, data.codes)
    ce = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, logits.shape[-1]).float(),
                                           data.codes[:, 4:].reshape(-1))
    # per token, log-sum-exp over the vocabulary (its sum's relative error is the log's absolute one), here
    # on another shape; then the mean over the tokens
    atol = reduction_tol(torch.float32, logits.shape[-1]) + reduction_tol(torch.float32, n_tokens, ce.item())
    torch.testing.assert_close(student.loss(cond, data.codes, token_weights=weights), ce, rtol=0, atol=atol)


def test_insert_prefix_keeps_left_padding_layout():
    feats = torch.arange(2 * 6 * 2, dtype=torch.float).view(2, 6, 2)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    prefix = -torch.ones(2, 2)
    out = insert_prefix(PromptBatch(feats, mask), prefix, torch.tensor([True, False]))
    assert out.features.shape == feats.shape
    assert out.mask[0].tolist() == [False, True, True, True, True, True]
    assert torch.equal(out.features[0, 1:3], prefix) and torch.equal(out.features[0, 3:], feats[0, 3:])
    assert torch.equal(out.features[1], feats[1] * mask[1, :, None])


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("name", ["two_stage_lora", "arbooth"])
def test_resume_gives_the_same_artifacts(student_params, tmp_path, name):
    def run(folder: Path, stop_at: int | None):
        student, recipe = trained(student_params, name)
        step_fn, count = recipe.train_step, [0]

        def train_step():
            count[0] += 1
            if stop_at is not None and count[0] == stop_at:
                raise Interrupt
            return step_fn()

        recipe.train_step = train_step
        total = recipe.cfg.steps + (recipe.cfg.embedding_steps if recipe.cfg.method == "two_stage" else 0)
        train(recipe, total, RecordingLogger(), Checkpointer(tmp_path / f"ckpt-{folder.name}", every=2))
        folder.mkdir()
        return recipe.save(folder)

    straight = run(tmp_path / "straight", None)
    with pytest.raises(Interrupt):
        run(tmp_path / "resumed", stop_at=5)  # killed after step 4's checkpoint (stage 2 for two_stage)
    assert sorted(p.name for p in (tmp_path / "ckpt-resumed").iterdir()) == ["step-0000004.pt"]
    run(tmp_path / "resumed", None)
    for f in straight:
        path = f"{f}/adapter_model.safetensors" if f == ADAPTER_DIR else f
        a, b = load_file(str(tmp_path / "straight" / path)), load_file(str(tmp_path / "resumed" / path))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same kernels: bit for bit


@pytest.mark.parametrize("name", list(CONFIGS))
def test_saved_artifacts_regenerate_the_same_image(any_family, tmp_path, name):
    student_params = any_family
    student, recipe = trained(student_params, name)
    cfg = recipe.cfg
    for _ in range(cfg.steps + (cfg.embedding_steps if cfg.method == "two_stage" else 0)):
        recipe.train_step()
    files = recipe.save(tmp_path)
    write_card(tmp_path, cfg, student_params, files, {"identifier": "sks", "class_noun": "toy"}, None)
    expected = {"proxy_tuning": [ADAPTER_DIR], "two_stage_lora": [IDENTIFIERS_FILE, ADAPTER_DIR],
                "two_stage_qkv": [IDENTIFIERS_FILE, TUNED_WEIGHTS_FILE],
                "arbooth": [IDENTIFIERS_FILE, TUNED_WEIGHTS_FILE]}[name]
    assert files == expected and json.loads((tmp_path / "card.json").read_text())["method"] == cfg.method

    prefix = recipe.trainable.prefix.detach() if cfg.method == "arbooth" else None
    in_memory = TunedStudent(student, "sks", prefix)
    reloaded = load_tuned(tmp_path, student_params)
    base = TunedStudent(load_student(student_params), "sks", None)
    prompts = ["a sks toy in the jungle"]
    sampling = {"cfg_scale": 3.0, "seed": 11}
    ours, theirs = in_memory.generate(prompts, **sampling), reloaded.generate(prompts, **sampling)
    assert torch.equal(ours, theirs)  # same weights, same kernels, same shapes: bit for bit
    with torch.no_grad():
        codes = in_memory.student.encode_images(ours)
        delta = (reloaded.student.logits(reloaded.condition(prompts), codes)
                 - base.student.logits(base.condition(prompts), codes)).abs().max()
    assert delta > 1e-4  # the artifacts really change the model

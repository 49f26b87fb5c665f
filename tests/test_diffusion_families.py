"""DreamBooth-LoRA on a tiny replica of every supervisor family: train, save, reload with plain diffusers."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RecordingLogger, assert_one_line
from PIL import Image
from safetensors import safe_open
from tolerances import chain_tol, elementwise_tol, network_terms

from proxytune.diffusion import load_pipeline, pipeline_index, sample
from proxytune.dreambooth import KOHYA_FILE, LORA_FILE, DreamBoothConfig, DreamBoothLoRA, pivotal_token_names
from proxytune.params import ProxytuneError
from proxytune.prompts import corpus_words
from proxytune.training import Checkpointer, train
from testbed.tiny_supervisors import FAMILIES, build_tiny_pipeline

PROMPT = "a photo of sks toy"
PIPELINES = {"sd": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
             "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> Path:
    """Every family's tiny replica, built once, plus three 64 px instance photos."""
    root = tmp_path_factory.mktemp("families")
    for family in FAMILIES:
        build_tiny_pipeline(family, root / family, corpus_words(), seed=0)
    rng = np.random.default_rng(0)
    (root / "instance").mkdir()
    for i in range(3):
        # smooth colour blobs, not noise, so the VAE latents are image-like
        base = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        Image.fromarray(base).resize((64, 64), Image.Resampling.BICUBIC).save(root / "instance" / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def class_image_cache(replicas, monkeypatch):
    monkeypatch.setenv("PROXYTUNE_CACHE", str(replicas / "cache"))


def config(replicas: Path, family: str, **overrides) -> DreamBoothConfig:
    values = dict(model=str(replicas / family), instance_images=sorted((replicas / "instance").glob("*.png")),
                  instance_prompt=PROMPT, class_prompt="a photo of toy", lora_rank=4, lora_alpha=8,
                  learning_rate=2e-2, steps=2, num_class_images=2, class_batch_size=2, sample_steps=2,
                  guidance_scale=3.0, pivotal_tokens=0, seed=0)
    return DreamBoothConfig(**{**values, **overrides})


def trained(cfg: DreamBoothConfig, steps: int = 2) -> DreamBoothLoRA:
    recipe = DreamBoothLoRA(cfg)
    recipe.setup()
    for _ in range(steps):
        recipe.train_step()
    return recipe


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def lora_weights(recipe: DreamBoothLoRA) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in recipe.trainable.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_lora_reloads_into_a_fresh_pipeline_and_gives_the_same_image(replicas, tmp_path, family):
    assert pipeline_index(str(replicas / family))["_class_name"] == PIPELINES[family]
    recipe = trained(config(replicas, family))
    trainable = [n for n, p in recipe.trainable.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    if family == "sd2":
        assert recipe.noise_scheduler.config.prediction_type == "v_prediction"

    recipe.save(tmp_path)
    with safe_open(str(tmp_path / LORA_FILE), "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == {"transformer" if family in ("sd3", "flux") else "unet"}

    want = recipe.render([PROMPT], [7])[0]
    got = sample(load_pipeline(str(replicas / family), lora_dir=tmp_path), [PROMPT], [7], 2, 3.0, resolution=64)[0]
    base = sample(load_pipeline(str(replicas / family)), [PROMPT], [7], 2, 3.0, resolution=64)[0]
    assert np.array_equal(pixels(got), pixels(want))  # same weights, same kernels, same shapes: bit for bit
    assert np.abs(pixels(got) - pixels(base)).mean() > 0.5, "the LoRA should visibly change the image"


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_prior_term_present_only_when_enabled(replicas, family):
    with_prior = DreamBoothLoRA(config(replicas, family))
    without = DreamBoothLoRA(config(replicas, family, prior_preservation=False))
    with_prior.setup()
    without.setup()
    assert len(with_prior.class_images) == 2 and without.class_images == []

    peak = []  # the largest prediction of each run's denoiser call
    for recipe in (with_prior, without):
        recipe.denoiser.register_forward_hook(lambda module, args, out: peak.append(out[0].abs().max().item()))
    a, b = with_prior.train_step(), without.train_step()
    assert set(a) == {"loss", "instance_loss", "prior_loss"} and set(b) == {"loss", "instance_loss"}
    # same generator: the instance term draws the same batch, noise and timesteps in both runs. With the prior
    # its rows share one denoiser call with the class rows (twice the rows: other shapes), so its predictions
    # agree to rounding, each within chain_tol of the largest; the loss, a mean of squared errors e, moves by at
    # most 2 mean|e| times that, and mean|e| <= sqrt(loss). Another batch would move it by far more.
    error = chain_tol(torch.float32, network_terms(with_prior.denoiser), max(peak))
    assert a["instance_loss"] == pytest.approx(b["instance_loss"], abs=2 * math.sqrt(b["instance_loss"]) * error)
    # the recipe's float32 sum (prior_loss_weight 1.0), redone in float32: one correctly rounded addition
    assert a["loss"] == float(np.float32(a["instance_loss"]) + np.float32(a["prior_loss"])) and a["prior_loss"] > 0
    assert b["loss"] == b["instance_loss"]  # no prior term: the loss is the instance term itself
    wa, wb = lora_weights(with_prior), lora_weights(without)
    assert any(not torch.allclose(wa[n], wb[n]) for n in wa), "the prior term must reach the gradients"


def test_resume_from_checkpoint_ends_with_the_same_lora(replicas, tmp_path):
    # text-encoder LoRA, pivotal tokens and LoRA dropout: every kind of state a resume must restore
    cfg = config(replicas, "flux", train_text_encoder=True, text_encoder_lr=1e-2, pivotal_tokens=2,
                 lora_dropout=0.1, steps=4)
    straight = DreamBoothLoRA(cfg)
    straight.setup()
    train(straight, 4, RecordingLogger(), Checkpointer(tmp_path / "none", 0))

    checkpoints = Checkpointer(tmp_path / "ckpt", 2)
    first = DreamBoothLoRA(cfg)
    first.setup()
    train(first, 3, RecordingLogger(), checkpoints)  # "killed" after step 3; the newest checkpoint is step 2
    resumed = DreamBoothLoRA(cfg)
    resumed.setup()
    log = RecordingLogger()
    history = train(resumed, 4, log, checkpoints)
    assert [s for _, s in log.logged] == [3, 4] and [h["step"] for h in history] == [1, 2, 3, 4]

    want, got = lora_weights(straight), lora_weights(resumed)
    assert want.keys() == got.keys() and any("text_encoder" in n for n in want)
    for name in want:  # the same steps with the same kernels and shapes, resumed from exact state: bit for bit
        assert torch.equal(want[name], got[name]), name


def test_text_encoder_lora_and_pivotal_tokens_reload_for_two_encoders(replicas, tmp_path):
    cfg = config(replicas, "sdxl", train_text_encoder=True, text_encoder_lr=1e-2, pivotal_tokens=2)
    recipe = trained(cfg)
    tokens = pivotal_token_names("sks", 2)
    assert recipe.instance_prompts == ["a photo of <sks> toy"] * 3
    # only the new tokens' rows of each embedding table moved
    for name, te in recipe.text_encoders.items():
        weight = te.get_input_embeddings().weight.detach()
        moved = (weight != recipe.original_embeddings[name]).any(dim=1).nonzero().flatten().tolist()
        assert moved == recipe.token_ids[name].tolist()

    recipe.save(tmp_path, export_kohya=True)
    with safe_open(str(tmp_path / LORA_FILE), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"unet", "text_encoder", "text_encoder_2"}
    with safe_open(str(tmp_path / "embeddings.safetensors"), "pt") as f:
        assert set(f.keys()) == {"clip_l", "clip_g"} and f.get_tensor("clip_l").shape[0] == 2
    with safe_open(str(tmp_path / KOHYA_FILE), "pt") as f:
        kohya = {k: f.get_tensor(k) for k in f.keys()}
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}
    assert all(k.startswith("lora_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in kohya)
    assert all(float(v) == 8.0 for k, v in kohya.items() if k.endswith(".alpha"))

    fresh = load_pipeline(cfg.model, lora_dir=tmp_path)
    assert all(t in fresh.tokenizer.get_vocab() and t in fresh.tokenizer_2.get_vocab() for t in tokens)
    want = recipe.render(["a photo of <sks> toy"], [3])[0]
    got = sample(fresh, ["a photo of <sks> toy"], [3], 2, 3.0, resolution=64)[0]
    assert np.array_equal(pixels(got), pixels(want))  # same weights, same kernels, same shapes: bit for bit


@pytest.mark.parametrize("family,precision", [("sd", "bf16"), ("sd3", "fp16")])
def test_mixed_precision_keeps_lora_in_fp32(replicas, family, precision):
    recipe = DreamBoothLoRA(config(replicas, family, mixed_precision=precision, gradient_checkpointing=True))
    recipe.setup()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert recipe.denoiser.dtype == dtype and recipe.denoiser.is_gradient_checkpointing
    before = lora_weights(recipe)
    assert all(p.dtype == torch.float32 for p in before.values())
    for _ in range(2):  # fp16: the grad scaler unscales fp32 grads, never fp16 ones
        losses = recipe.train_step()
        assert all(np.isfinite(v) for v in losses.values())
    after = lora_weights(recipe)
    assert all(p.dtype == torch.float32 for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_cached_and_uncached_latents_train_the_same(replicas):
    cfg = config(replicas, "sd2", cache_latents=True)
    a = trained(cfg, steps=1)
    b = trained(config(replicas, "sd2", cache_latents=False), steps=1)
    assert b.instance_latents is None
    # Caching VAE-encodes the three instance images in one batch, not caching one image per step: other conv
    # kernels, so the runs agree to rounding, not bit for bit. The step's gradients (still in .grad, after
    # clipping) come from a VAE-encoder pass and a UNet forward and backward pass.
    params_a, params_b = dict(a.trainable.named_parameters()), dict(b.trainable.named_parameters())
    grads = {n: (p.grad, params_b[n].grad) for n, p in params_a.items() if p.grad is not None}
    assert grads and all(gb is not None for _, gb in grads.values())
    largest = max(ga.abs().max().item() for ga, _ in grads.values())
    terms = network_terms(a.pipe.vae.encoder) + network_terms(a.denoiser, backward=True)
    for n, (ga, gb) in grads.items():
        torch.testing.assert_close(gb, ga, rtol=0, atol=chain_tol(torch.float32, terms, largest), msg=n)
    # AdamW's first step moves each weight by lr * g / (|g| + eps) (m and v bias-corrected): within
    # lr * |ga - gb| * max f' of the gradients, f'(g) = eps / (|g| + eps)**2 taken at the smaller |g|, or at 0
    # when the signs differ. It magnifies gradients near eps = 1e-8 (pure rounding noise there) up to
    # lr / eps times, so no fixed tolerance on the weights is both safe and tight. The ~8 float32 roundings
    # of the update itself: elementwise_tol.
    eps, lr = a.optimizer.defaults["eps"], cfg.learning_rate
    wa, wb = lora_weights(a), lora_weights(b)
    assert wa.keys() == wb.keys() and set(grads) <= set(wa)
    for n in wa:
        ga, gb = grads.get(n, (torch.zeros_like(wa[n]), torch.zeros_like(wa[n])))
        flat = torch.where(ga * gb > 0, torch.minimum(ga.abs(), gb.abs()), torch.zeros_like(ga))
        bound = lr * (ga - gb).abs() * eps / (flat + eps) ** 2 + elementwise_tol(torch.float32, 8, lr + wa[n].abs())
        excess = (wa[n] - wb[n]).abs() - bound
        assert (excess <= 0).all(), (n, excess.max().item())


def test_loss_weighting_snr_gamma_and_flow_schemes(replicas):
    plain = DreamBoothLoRA(config(replicas, "sd2", prior_preservation=False))
    snr = DreamBoothLoRA(config(replicas, "sd2", prior_preservation=False, snr_gamma=5.0))
    for recipe in (plain, snr):
        recipe.setup()
    # v-prediction weight min(SNR, 5) / (SNR + 1) < 1 at every timestep: same draws, smaller loss
    a, b = plain.train_step()["loss"], snr.train_step()["loss"]
    assert 0 < b < a

    flow = DreamBoothLoRA(config(replicas, "sd3", prior_preservation=False, weighting_scheme="logit_normal"))
    flow.setup()
    assert np.isfinite(flow.train_step()["loss"])


def test_scheduler_names_map_to_family_correct_samplers(replicas):
    assert type(load_pipeline(str(replicas / "sd2"), scheduler="euler").scheduler).__name__ == "EulerDiscreteScheduler"
    pipe = load_pipeline(str(replicas / "sd2"), scheduler="ddim")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # the config carries over
    assert type(load_pipeline(str(replicas / "flux")).scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(ProxytuneError) as err:
        load_pipeline(str(replicas / "sd3"), scheduler="dpm++")
    assert_one_line(err, "dpm++", "sd3")
    with pytest.raises(ProxytuneError) as err:
        load_pipeline(str(replicas / "instance"))
    assert_one_line(err, "model_index.json")

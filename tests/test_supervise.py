"""Stage `supervise`: the DreamBooth-LoRA recipe driven step by step, and the stage's files reloaded by diffusers."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from proxytune.diffusion import load_pipeline, sample
from proxytune.params import load_params
from tasks import prepare, supervise
from tasks.supervise import LORA_FILE, DreamBoothConfig, DreamBoothLoRA

MODEL = "models/tiny/supervisor"


def recipe_config(**overrides) -> DreamBoothConfig:
    """A tiny config on the instance images `prepare` wrote in the current project."""
    values = dict(model=MODEL, instance_images=sorted(Path("outputs/prepare/instance").glob("*.png")),
                  instance_prompt="a photo of sks toy", class_prompt="a photo of toy", lora_rank=4, lora_alpha=4,
                  learning_rate=1e-3, steps=2, batch_size=1, prior_loss_weight=1.0, num_class_images=2,
                  sample_steps=2, guidance_scale=5.0, seed=0)
    return DreamBoothConfig(**{**values, **overrides})


@pytest.fixture
def prepared(project, log):
    prepare.run(load_params(), log)
    assert len(list(Path("outputs/prepare/instance").glob("*.png"))) >= 2
    return project


def lora_state(unet) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}


def test_setup_trains_only_lora_and_steps_update_it(prepared):
    recipe = DreamBoothLoRA(recipe_config())
    recipe.setup()

    trainable = [n for n, p in recipe.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    # every targeted projection carries an adapter, and nothing else of the UNet trains
    adapted = [n for n, m in recipe.unet.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert adapted and all(n.endswith(tuple(supervise.LORA_TARGETS)) for n in adapted)
    assert len(trainable) == 2 * len(adapted)
    base = {n: p.detach().clone() for n, p in recipe.unet.named_parameters() if "lora_" not in n}
    assert base and not any(p.requires_grad for n, p in recipe.unet.named_parameters() if "lora_" not in n)
    for frozen in (recipe.pipe.vae, recipe.pipe.text_encoder):
        assert not any(p.requires_grad for p in frozen.parameters())
    assert sum(p.numel() for p in recipe.params) == sum(p.numel() for n, p in recipe.unet.named_parameters()
                                                        if p.requires_grad) > 0

    before = lora_state(recipe.unet)
    for _ in range(2):
        losses = recipe.train_step()
        assert set(losses) == {"loss", "instance_loss", "prior_loss"}
        assert all(math.isfinite(v) for v in losses.values())
        assert losses["instance_loss"] > 0 and losses["prior_loss"] > 0
    after = lora_state(recipe.unet)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_A" in n)
    for n, p in recipe.unet.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), f"frozen UNet weight {n} changed"


def test_prior_loss_is_on_base_model_class_images(prepared):
    cfg = recipe_config(prior_loss_weight=1.0)
    with_prior, without_prior = DreamBoothLoRA(cfg), DreamBoothLoRA(recipe_config(prior_loss_weight=0.0))
    with_prior.setup()
    without_prior.setup()

    # the class images are what the untouched base model renders for the class prompt
    assert len(with_prior.class_images) == cfg.num_class_images
    base = sample(load_pipeline(MODEL), [cfg.class_prompt] * cfg.num_class_images,
                  [cfg.seed * 100_000 + i for i in range(cfg.num_class_images)], cfg.sample_steps,
                  cfg.guidance_scale, resolution=64)
    for got, want in zip(with_prior.class_images, base):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    assert with_prior.class_latents[0].shape[0] == cfg.num_class_images

    # same seed: same draws, so only the weight of the prior term differs
    a, b = with_prior.train_step(), without_prior.train_step()
    assert a["instance_loss"] == pytest.approx(b["instance_loss"], rel=1e-6)
    assert a["prior_loss"] == pytest.approx(b["prior_loss"], rel=1e-6) and a["prior_loss"] > 0
    assert a["loss"] == pytest.approx(a["instance_loss"] + a["prior_loss"], rel=1e-5)
    assert b["loss"] == pytest.approx(b["instance_loss"], rel=1e-6)
    assert a["loss"] != pytest.approx(b["loss"], rel=1e-3)
    # and the prior term reaches the gradients, not just the reported number
    wa, wb = lora_state(with_prior.unet), lora_state(without_prior.unet)
    assert any(not torch.allclose(wa[n], wb[n]) for n in wa)


class Recorded(DreamBoothLoRA):
    instances: list[DreamBoothLoRA] = []

    def setup(self):
        Recorded.instances.append(self)
        super().setup()


def test_run_writes_diffusers_lora_that_reloads(project, log, monkeypatch):
    params = load_params()
    # alpha != rank: the saved file must carry the scaling; large lr so the LoRA visibly changes images
    params["supervisor"].update(lora_rank=4, lora_alpha=8, learning_rate=2e-2)
    steps, n_class = int(params["supervisor"]["steps"]), int(params["supervisor"]["num_class_images"])
    Recorded.instances = []
    monkeypatch.setattr(supervise, "DreamBoothLoRA", Recorded)
    prepare.run(params, log)
    result = supervise.run(params, log)
    (recipe,) = Recorded.instances

    out = Path("outputs/supervise")
    assert Path(result["lora_dir"]) == out
    with safe_open(str(out / LORA_FILE), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") for k in keys)
    downs = [k for k in keys if ".lora.down." in k or ".lora_A." in k]
    ups = [k for k in keys if ".lora.up." in k or ".lora_B." in k]
    assert downs and len(downs) == len(ups) and len(downs) + len(ups) == len(keys)

    class_files = sorted((out / "class_images").glob("*.png"))
    assert len(class_files) == n_class
    for path, img in zip(class_files, recipe.class_images):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(img))

    with open("outputs/supervise_loss.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    assert set(rows[0]) == {"step", "loss", "instance_loss", "prior_loss"}
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("loss", "instance_loss", "prior_loss"))
    assert [s for _, s in log.logged if s is not None] == list(range(1, steps + 1))
    assert float(rows[-1]["loss"]) == pytest.approx(log.logged[-1][0]["loss"], rel=1e-4)

    # a plain diffusers pipeline loads the file and reproduces the trained UNet exactly
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe("a photo of sks toy", num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, emb = torch.tensor([500]), recipe.instance_embeds
    with torch.no_grad():
        base_pred = pipe.unet(x, t, encoder_hidden_states=emb).sample
    without = generate()
    pipe.load_lora_weights(str(out))
    with_lora = generate()
    recipe.unet.eval()
    with torch.no_grad():
        loaded_pred = pipe.unet(x, t, encoder_hidden_states=emb).sample
        trained_pred = recipe.unet(x, t, encoder_hidden_states=emb).sample
    assert not torch.allclose(loaded_pred, base_pred, atol=1e-3)
    torch.testing.assert_close(loaded_pred, trained_pred, atol=1e-5, rtol=1e-5)
    assert np.abs(with_lora - without).mean() > 1e-3

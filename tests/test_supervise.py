"""Stage `supervise`: the DreamBooth-LoRA recipe on the embedded SD1.5 supervisor, and the stage's files
reloaded by diffusers (every other family: tests/test_diffusion_families.py)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import assert_one_line, edit_params, paths
from PIL import Image
from safetensors import safe_open

from proxytune.diffusion import load_pipeline, sample
from proxytune.dreambooth import DENOISER_TARGETS, KOHYA_FILE, LORA_FILE, DreamBoothConfig, DreamBoothLoRA
from proxytune.params import ProxytuneError, load_params
from tasks import prepare, supervise

MODEL = "models/world/supervisor"  # what params.yaml points at (32 px)


def recipe_config(project: Path, **overrides) -> DreamBoothConfig:
    """A tiny config on the instance images `prepare` wrote in the test folder `project`: LoRA alone (pivotal
    tokens are tested on their own below)."""
    instance = paths(project, "prepare")["out"] / "instance"
    values = dict(model=MODEL, instance_images=sorted(instance.glob("*.png")),
                  instance_prompt="a sks toy", class_prompt="a toy", lora_rank=4, lora_alpha=4,
                  learning_rate=1e-3, steps=2, batch_size=1, prior_loss_weight=1.0, num_class_images=2,
                  class_batch_size=2, sample_steps=2, guidance_scale=5.0, pivotal_tokens=0, seed=0)
    return DreamBoothConfig(**{**values, **overrides})


@pytest.fixture
def prepared(project, log):
    prepare.run(load_params(project / "params.yaml"), log, paths(project, "prepare"))
    assert len(list((project / "outputs/prepare/instance").glob("*.png"))) >= 2
    return project


def lora_state(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}


def test_setup_trains_only_lora_and_steps_update_it(prepared):
    recipe = DreamBoothLoRA(recipe_config(prepared))
    recipe.setup()
    unet = recipe.denoiser
    assert unet is recipe.pipe.unet

    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    # every targeted projection carries an adapter, and nothing else of the UNet trains
    adapted = [n for n, m in unet.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert adapted and all(n.endswith(tuple(DENOISER_TARGETS["sd"])) for n in adapted)
    assert len(trainable) == 2 * len(adapted)
    base = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" not in n}
    for frozen in (recipe.pipe.vae, recipe.pipe.text_encoder):
        assert not any(p.requires_grad for p in frozen.parameters())
    assert sum(p.numel() for p in recipe.params) == len(torch.nn.utils.parameters_to_vector(recipe.params))
    assert {id(p) for p in recipe.params} == {id(p) for p in unet.parameters() if p.requires_grad}

    before = lora_state(unet)
    for _ in range(2):
        losses = recipe.train_step()
        assert set(losses) == {"loss", "instance_loss", "prior_loss"}
        assert all(math.isfinite(v) for v in losses.values()) and losses["prior_loss"] > 0
    after = lora_state(unet)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_A" in n)
    for n, p in unet.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), f"frozen UNet weight {n} changed"


def test_pivotal_tuning_moves_only_the_new_token_rows_at_the_token_rate(prepared):
    """params.yaml's supervisor: the identifier becomes two learned embeddings beside the LoRA."""
    recipe = DreamBoothLoRA(recipe_config(prepared, pivotal_tokens=2, token_lr=5e-3))
    recipe.setup()
    table = recipe.pipe.text_encoder.get_input_embeddings().weight
    (group,) = [g for g in recipe.optimizer.param_groups if any(p is table for p in g["params"])]
    assert group["lr"] == 5e-3 and group["params"] == [table]
    assert set(recipe.instance_prompts) == {"a <sks> toy"}
    before = table.detach().clone()
    for _ in range(2):
        recipe.train_step()
    moved = (table.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert moved == recipe.token_ids["text_encoder"].tolist() and len(moved) == 2


def test_class_images_are_the_base_models_cached_and_only_missing_ones_rendered(prepared):
    cfg = recipe_config(prepared, num_class_images=2)
    first = DreamBoothLoRA(cfg)
    first.setup()
    assert first.class_images_rendered == 2 and len(first.class_images) == 2
    # what the untouched base model renders for the class prompt, in batches of class_batch_size
    base = sample(load_pipeline(MODEL), [cfg.class_prompt] * 2, [0, 1], cfg.sample_steps, cfg.guidance_scale,
                  resolution=32, batch_size=cfg.class_batch_size)
    for got, want in zip(first.class_images, base):
        assert np.array_equal(np.asarray(got), np.asarray(want))

    again = DreamBoothLoRA(recipe_config(prepared, num_class_images=3))
    again.setup()
    assert again.class_images_rendered == 1  # the two cached ones are reused
    for got, want in zip(again.class_images[:2], base):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    other = DreamBoothLoRA(recipe_config(prepared, num_class_images=1, class_prompt="a photo of cup"))
    other.setup()
    assert other.class_images_rendered == 1  # a different class prompt is a different cache entry


class Recorded(DreamBoothLoRA):
    instances: list[DreamBoothLoRA] = []

    def setup(self):
        Recorded.instances.append(self)
        super().setup()


def test_run_writes_diffusers_lora_that_reloads(project, log, monkeypatch):
    params = load_params(project / "params.yaml")
    # alpha != rank: the saved file must carry the scaling; large lr so the LoRA visibly changes images
    # LoRA alone: the reload below is the UNet's (pivotal tokens reload in tests/test_diffusion_families.py)
    params["supervisor"].update(lora_rank=4, lora_alpha=8, learning_rate=2e-2, validation_every=2,
                                export_kohya=True, pivotal_tokens=0)
    steps, n_class = int(params["supervisor"]["steps"]), int(params["supervisor"]["num_class_images"])
    Recorded.instances = []
    monkeypatch.setattr(supervise, "DreamBoothLoRA", Recorded)
    prepare.run(params, log, paths(project, "prepare"))
    # per-image captions: each instance image trains with its own line of captions.jsonl
    captions = project / "outputs/prepare/captions.jsonl"
    rows = [json.loads(line) for line in captions.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["caption"] = f"a photo of sks toy, view {i}"
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = supervise.run(params, log, paths(project, "supervise"))
    (recipe,) = Recorded.instances
    assert recipe.instance_prompts == [r["caption"] for r in rows]

    out = project / "outputs/supervise"
    assert Path(result["lora_dir"]) == out
    with safe_open(str(out / LORA_FILE), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") for k in keys)
    downs = [k for k in keys if ".lora.down." in k or ".lora_A." in k]
    ups = [k for k in keys if ".lora.up." in k or ".lora_B." in k]
    assert downs and len(downs) == len(ups) and len(downs) + len(ups) == len(keys)
    with safe_open(str(out / KOHYA_FILE), "pt") as f:
        assert all(k.startswith("lora_unet_") for k in f.keys()) and len(list(f.keys())) == len(keys) * 3 // 2

    class_files = sorted((out / "class_images").glob("*.png"))
    assert len(class_files) == n_class
    for path, img in zip(class_files, recipe.class_images):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(img))

    with open(project / "outputs/supervise_loss.csv", newline="") as f:
        loss_rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in loss_rows] == list(range(1, steps + 1))
    assert set(loss_rows[0]) == {"step", "loss", "instance_loss", "prior_loss"}
    assert [s for _, s in log.logged if s is not None] == list(range(1, steps + 1))
    # the same Python float, logged and written with repr (which round-trips): exactly equal
    assert float(loss_rows[-1]["loss"]) == log.logged[-1][0]["loss"]
    # validation images every 2 steps went to the logger (MLflow in the stage)
    validation = [a for a in log.artifacts if "step-" in a]
    assert [Path(a).name for a in validation] == [f"step-{s:06d}" for s in range(2, steps + 1, 2)]

    # a plain diffusers pipeline loads the file and reproduces the trained UNet exactly
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, emb = torch.tensor([500]), recipe.embeds[rows[0]["caption"]]["encoder_hidden_states"]
    with torch.no_grad():
        base_pred = pipe.unet(x, t, encoder_hidden_states=emb).sample
    pipe.load_lora_weights(str(out))
    recipe.denoiser.eval()
    with torch.no_grad():
        loaded_pred = pipe.unet(x, t, encoder_hidden_states=emb).sample
        trained_pred = recipe.denoiser(x, t, encoder_hidden_states=emb).sample
    assert not torch.allclose(loaded_pred, base_pred, atol=1e-3)
    # the same LoRA layers with the same weights (float32 in the file), the same kernels on the same input:
    # bit for bit
    assert torch.equal(loaded_pred, trained_pred)


@pytest.mark.parametrize("key,value,names", [
    ("mixed_precision", "fp8", ["supervisor.mixed_precision = 'fp8'", "'fp16'"]),
    ("train_text_encoder", "yes", ["supervisor.train_text_encoder = 'yes': must be true or false"]),
    ("lora_rank", "four", ["supervisor.lora_rank = 'four': must be a whole number"]),
])
def test_bad_supervisor_params_stop_with_one_line(project, key, value, names):
    edit_params(project, "supervisor", **{key: value})
    with pytest.raises(ProxytuneError) as err:
        load_params(project / "params.yaml")
    assert_one_line(err, *names)


def test_a_scheduler_that_does_not_fit_the_model_stops_with_one_line(prepared, log):
    """A valid sampler name for another family: only the loaded model can tell."""
    params = load_params(prepared / "params.yaml")
    params["supervisor"]["scheduler"] = "flow-euler"
    with pytest.raises(ProxytuneError) as err:
        supervise.run(params, log, paths(prepared, "supervise"))
    assert_one_line(err, "flow-euler", "sd")


@pytest.mark.parametrize("preset", ["supervisor_sdxl.yaml", "supervisor_sd3.yaml"])
def test_presets_overlay_params_with_known_keys_only(prepared, preset):
    overlay = yaml.safe_load((Path(__file__).resolve().parent.parent / "presets" / preset).read_text())
    params = load_params(prepared / "params.yaml")
    for section, values in overlay.items():
        unknown = set(values) - set(params[section])
        assert not unknown, f"{preset}: {section} has keys params.yaml does not: {unknown}"
        params[section].update(values)
    assert "/" in params["supervisor"]["model"]  # a hub id: only the model path needs changing on a GPU
    params["supervisor"]["model"] = MODEL
    cfg = supervise.recipe_config(params, [Path("x.png")], ["a photo of sks toy"])
    assert cfg.steps == 500 and cfg.mixed_precision == "fp16" and cfg.gradient_checkpointing

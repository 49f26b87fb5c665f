"""Pretraining the tiny models on the world: each trains (its fixed-batch loss falls), is saved in the format the
pipeline's own loaders read, and is a pure function of (steps, seed)."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_one_line
from PIL import Image
from safetensors.torch import load_file

from ar_models import load_student
from proxytune.metrics import ClipEmbedder, DinoEmbedder
from proxytune.params import ProxytuneError
from testbed import world, world_pretrain
from testbed.tiny_evaluators import TINY_CLIP_NAME

SIZE = 32
# Small budgets: a few seconds each on one CPU thread, enough for the fixed-batch losses to fall.
RUNS = {
    "clip": lambda out: world_pretrain.pretrain_clip(out, steps=80, seed=3, size=SIZE, batch_size=16),
    "dino": lambda out: world_pretrain.pretrain_dino(out, steps=100, seed=3, size=SIZE, batch_size=16),
    "llamagen": lambda out: world_pretrain.pretrain_llamagen(out, steps=12, vq_steps=4, seed=3, size=SIZE,
                                                             batch_size=8),
    "supervisor": lambda out: world_pretrain.pretrain_supervisor(out, steps=15, vae_steps=4, text_steps=8, seed=3,
                                                                 size=SIZE, batch_size=8),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each model trained once: {name: (out_dir, history)}."""
    root = tmp_path_factory.mktemp("trained")
    return {name: (root / name, run(root / name)) for name, run in RUNS.items()}


@pytest.fixture(scope="module")
def held_out():
    """Renders and captions no training step drew (another stream)."""
    return world.WorldStream(0, "held-out", SIZE).batch(0, 32)


def _evals(history, phase):
    before, after = (r["loss"] for r in history if r["phase"] == f"{phase}/eval")
    return before, after


@pytest.mark.parametrize("name,phases", [("clip", ["clip"]), ("dino", ["dino"]), ("llamagen", ["vq", "gpt"]),
                                         ("supervisor", ["text", "vae", "unet"])])
def test_loss_falls_on_the_fixed_batch(trained, name, phases):
    history = trained[name][1]
    for phase in phases:
        steps = [r for r in history if r["phase"] == phase]
        assert steps and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
        before, after = _evals(history, phase)
        assert after < 0.9 * before, f"{phase}: fixed-batch loss {before:.3f} -> {after:.3f}"


def test_clip_loads_and_matches_images_to_their_captions(trained, held_out):
    out = trained["clip"][0]
    clip = ClipEmbedder(TINY_CLIP_NAME, out / "open_clip_model.safetensors", config_dir=out)
    images, captions, _ = held_out
    sim = clip.embed_images([Image.fromarray(a) for a in images[:16]]) @ clip.embed_texts(captions[:16]).T
    diagonal = sim.diagonal().mean()
    off = (sim.sum() - sim.diagonal().sum()) / (sim.numel() - len(sim))
    assert diagonal > off + 0.05, (float(diagonal), float(off))


def test_dino_loads_and_separates_colours(trained, held_out):
    dino = DinoEmbedder(trained["dino"][0])
    images, _, specs = held_out
    emb = dino.embed_images([Image.fromarray(a) for a in images])
    assert emb.shape == (32, 48)
    colour = torch.tensor([list(world.COLOURS).index(s.look()[0]) for s in specs])  # the first attribute learnt
    same = (colour[:, None] == colour[None]) & ~torch.eye(32, dtype=torch.bool)
    sim = emb @ emb.T
    assert sim[same].mean() > sim[~same].mean(), "same-colour objects should be closer than different-colour ones"


def test_llamagen_loads_through_the_pipeline_loader(trained):
    out = trained["llamagen"][0]
    assert sorted(p.name for p in out.iterdir()) == ["t2i.pt", "text_encoder", "vq.pt"]
    student = load_student({"family": "llamagen", "size": "tiny", "vq_size": "tiny", "checkpoint": str(out / "t2i.pt"),
                            "vq_checkpoint": str(out / "vq.pt"), "text_encoder": str(out / "text_encoder"),
                            "image_size": SIZE, "device": "cpu"})
    saved = torch.load(out / "t2i.pt", weights_only=True)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in student.gpt.state_dict().items())
    images = student.generate(["a red ball on the beach"], cfg_scale=2.0, seed=0)
    assert images.shape == (1, 3, SIZE, SIZE)
    # the caption words the world uses are in the T5 vocabulary
    assert student.tokenizer.unk_token_id not in student.tokenizer("a yellow and blue dotted can").input_ids


def test_vq_dead_codes_restart_on_current_latents(held_out):
    from ar_models.llamagen import VQ_SIZES, VQModel

    torch.manual_seed(0)
    vq = VQModel(VQ_SIZES["tiny"])
    K = vq.config.codebook_size
    idle = torch.full((K,), world_pretrain.DEAD_AFTER * K)  # every code has been idle too long
    before = vq.quantize.embedding.weight.detach().clone()
    x = world_pretrain._pixels(held_out[0][:2])
    with torch.no_grad():
        used = vq.quantize.quantize(torch.nn.functional.normalize(vq.quant_conv(vq.encoder(x)), dim=1)).unique()
    world_pretrain._vq_loss(vq, x, idle=idle, generator=torch.Generator().manual_seed(0)).backward()
    moved = (vq.quantize.embedding.weight != before).any(1)
    assert moved.sum() >= K - 32 and not moved[used].any() and idle.max() == 0


def test_supervisor_loads_and_samples(trained):
    from proxytune.diffusion import load_pipeline, sample

    pipe = load_pipeline(str(trained["supervisor"][0]))
    assert pipe.vae.config.scaling_factor != pytest.approx(0.18215)  # set from the world's latents
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    images = sample(pipe, ["a red ball on the beach"], [0], steps=2, guidance=3.0, resolution=SIZE)
    assert images[0].size == (SIZE, SIZE)


def _weights(name, out):
    if name == "clip":
        return load_file(out / "open_clip_model.safetensors")
    if name == "dino":
        return load_file(out / "model.safetensors")
    if name == "llamagen":
        return {f"{f}.{k}": v for f in ("t2i", "vq") for k, v in torch.load(out / f"{f}.pt", weights_only=True)
                ["model"].items()}
    return {f"{c}.{k}": v for c, f in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                                       ("text_encoder", "model")) for k, v in
            load_file(out / c / f"{f}.safetensors").items()}


@pytest.mark.parametrize("name", list(RUNS))
def test_same_seed_same_weights(trained, tmp_path, name):
    out, history = trained[name]
    again = RUNS[name](tmp_path / name)
    assert [r["loss"] for r in again] == [r["loss"] for r in history]
    a, b = _weights(name, out), _weights(name, tmp_path / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same seed, kernels, shapes
    if name == "supervisor":
        config = json.loads((tmp_path / name / "vae" / "config.json").read_text())
        assert config["scaling_factor"] == json.loads((out / "vae" / "config.json").read_text())["scaling_factor"]


def test_bad_size_steps_and_group_are_one_line_errors(tmp_path):
    with pytest.raises(ProxytuneError) as err:
        world_pretrain.pretrain_dino(tmp_path / "out", steps=1, size=20)
    assert_one_line(err, "image size")
    with pytest.raises(ProxytuneError) as err:
        world_pretrain.pretrain_clip(tmp_path / "out", steps=-1)
    assert_one_line(err, "steps")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ProxytuneError) as err:
        world_pretrain.pretrain_group("vae", tmp_path / "out", world_pretrain.PLAN)
    assert_one_line(err, "group 'vae'")


def test_the_shipped_world_models_load_through_the_pipeline_loaders():
    """models/world is what params.yaml points at: each part loads with the loader a real checkpoint uses."""
    from conftest import REPO

    from orchestration import presets
    from proxytune.diffusion import load_pipeline
    from proxytune.params import load_params

    params = load_params(REPO / "params.yaml")
    student = dict(params["student"], device="cpu")
    for key in ("checkpoint", "vq_checkpoint", "text_encoder"):
        student[key] = str(REPO / student[key])
    assert load_student(student).generate(["a red ball on the beach"], seed=0).shape == (1, 3, 32, 32)
    var = dict(params["student"], **presets.read("student_var_world")["student"], device="cpu")
    for key in ("checkpoint", "vq_checkpoint", "tokenizer"):
        var[key] = str(REPO / var[key])
    assert load_student(var).generate(["a ball"], seed=0).shape == (1, 3, 32, 32)
    assert load_pipeline(str(REPO / params["supervisor"]["model"])).vae.config.sample_size == 32
    e = params["evaluate"]
    DinoEmbedder(REPO / e["dino"])
    ClipEmbedder(e["clip_model"], REPO / e["clip_pretrained"], config_dir=REPO / e["clip_config_dir"])


def test_the_shipped_world_models_were_trained_with_the_current_plan():
    from conftest import REPO

    plan = json.loads((REPO / "models/world/plan.json").read_text())
    assert {k: v for k, v in plan.items() if k not in ("seed", "storage")} == world_pretrain.PLAN


def test_store_half_rounds_float_weights_only_and_keeps_formats(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    weights = {"w": torch.randn(3, 4), "index": torch.arange(4)}
    torch.save({"model": dict(weights)}, tmp_path / "t2i.pt")
    save_file(dict(weights), tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text("{}")
    assert sorted(p.name for p in world_pretrain.store_half(tmp_path)) == ["model.safetensors", "t2i.pt"]
    pt = torch.load(tmp_path / "t2i.pt", weights_only=True)["model"]
    st = load_file(tmp_path / "model.safetensors")
    for state in (pt, st):
        assert state["w"].dtype == torch.float16 and torch.equal(state["w"], weights["w"].half())
        assert torch.equal(state["index"], weights["index"])
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses safetensors without it
    assert (tmp_path / "config.json").read_text() == "{}"


# ------------------------------------------------------------------------------------------------- VAR


def _pretrain_var(out):
    # 8 VQ steps: at batch 8 the dead codes first restart after 4 (a collapse to ~5 codes until then)
    return world_pretrain.pretrain_var(out, steps=12, vq_steps=8, seed=3, batch_size=8, model_size="world",
                                       vq_size="world")


@pytest.fixture(scope="module")
def var_trained(tmp_path_factory):
    """The world VAR trained once: (out_dir, history)."""
    out = tmp_path_factory.mktemp("trained_var") / "var"
    return out, _pretrain_var(out)


def test_var_loss_falls_on_the_fixed_batch(var_trained):
    history = var_trained[1]
    for phase in ("var_vq", "var"):
        steps = [r for r in history if r["phase"] == phase]
        assert steps and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
        before, after = _evals(history, phase)
        assert after < 0.9 * before, f"{phase}: fixed-batch loss {before:.3f} -> {after:.3f}"
    used = next(r["loss"] for r in history if r["phase"] == "var_vq/codes_used")
    assert used > 64, f"the transformer's evaluation batch uses {used:.0f} of 512 codes: the codebook collapsed"


def test_var_loads_through_the_pipeline_loader_with_the_preset_keys(var_trained):
    """The preset's keys, its folder replaced by this run's: the release layout that VAR's loaders read."""
    import yaml
    from conftest import REPO

    out = var_trained[0]
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer", "vae_world.pth", "var_world.pth"]
    preset = yaml.safe_load((REPO / "presets" / "student_var_world.yaml").read_text())["student"]
    keys = {k: v for k, v in preset.items() if k != "arbooth"}
    for key in ("checkpoint", "vq_checkpoint", "tokenizer"):
        keys[key] = str(out / keys[key].rsplit("/", 1)[1])
    student = load_student({**keys, "device": "cpu"})
    saved = torch.load(out / "var_world.pth", weights_only=True)
    assert saved.keys() == student.var.state_dict().keys()
    assert all(torch.equal(v, saved[k]) for k, v in student.var.state_dict().items())
    assert student.generate(["a red ball on the beach"], cfg_scale=2.0, seed=0).shape == (1, 3, SIZE, SIZE)
    assert student.class_ids("a sks toy on the beach") == [student.tokenizer.get_vocab()["toy"]]


def test_var_same_seed_same_weights(var_trained, tmp_path):
    out, history = var_trained
    again = _pretrain_var(tmp_path / "var")
    assert [r["loss"] for r in again] == [r["loss"] for r in history]
    for name in ("var_world.pth", "vae_world.pth"):
        a, b = (torch.load(d / name, weights_only=True) for d in (out, tmp_path / "var"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

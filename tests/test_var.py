"""VAR student: official checkpoint layout, strict loading, multi-scale tokens, block-causal teacher forcing,
VAR's ramped CFG sampling with a KV cache, class-embedding personalisation and the tuning recipes."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line
from tolerances import chain_tol, network_terms, reduction_tol

from ar_models import ModelConfigError
from ar_models.base import PromptBatch, insert_prefix
from ar_models.sampling import sample_logits
from ar_models.var import (
    VAR,
    VAR_SIZES,
    VQ_SIZES,
    VQVAE,
    VARConfig,
    VARStudent,
    load_vae_checkpoint,
    load_var_checkpoint,
)
from proxytune.tuning import TuneConfig, TuningData, build_recipe
from testbed.tiny_students import build_tiny_var

CORPUS = ["a photo of a dog", "a red cube on a table", "a cat sleeping in the snow", "a toy on the beach"]
PROMPTS = ["a photo of a dog", "a red cube on a table"]
SIZE = 64  # tiny scales (1, 2, 3, 4): N = 30 tokens
N = 30


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_tiny_var(tmp_path_factory.mktemp("var"), CORPUS, seed=0, image_size=SIZE)


def fresh(paths) -> VARStudent:
    return VARStudent.from_paths(**paths)


@pytest.fixture(scope="module")
def student(paths):
    return fresh(paths)


@pytest.fixture(scope="module")
def codes(student):
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return student.encode_images(images)


def _sd(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_build_tiny_writes_official_layout(paths):
    var = _sd(paths["checkpoint"])
    per_block = ["attn.mat_qkv.weight", "attn.q_bias", "attn.v_bias", "attn.zero_k_bias", "attn.scale_mul_1H11",
                 "attn.proj.weight", "attn.proj.bias", "ffn.fc1.weight", "ffn.fc1.bias", "ffn.fc2.weight",
                 "ffn.fc2.bias", "ada_lin.1.weight", "ada_lin.1.bias"]
    assert set(var) == {
        "word_embed.weight", "word_embed.bias", "class_emb.weight", "pos_start", "pos_1LC", "lvl_embed.weight",
        "lvl_1L", "attn_bias_for_masking", "head_nm.ada_lin.1.weight", "head_nm.ada_lin.1.bias", "head.weight",
        "head.bias", *(f"blocks.{i}.{k}" for i in range(2) for k in per_block),
    }
    words = len({w for line in CORPUS for w in line.split()})
    assert var["class_emb.weight"].shape == (words + 1, 64)  # + the unconditional class
    assert var["attn_bias_for_masking"].shape == (1, 1, N, N) and var["pos_1LC"].shape == (1, N, 64)
    assert var["lvl_1L"].tolist() == [[0] + [1] * 4 + [2] * 9 + [3] * 16]
    assert var["blocks.0.ada_lin.1.weight"].shape == (6 * 64, 64) and var["head.weight"].shape == (256, 64)
    assert var["attn_bias_for_masking"][0, 0, 4, 5] == -torch.inf and var["attn_bias_for_masking"][0, 0, 4, 1] == 0

    vae = _sd(paths["vq_checkpoint"])
    for key in ["encoder.conv_in.weight", "encoder.down.0.block.1.conv2.weight", "encoder.down.2.block.0.nin_shortcut.weight",
                "encoder.down.3.downsample.conv.weight", "encoder.down.4.attn.1.qkv.weight", "encoder.mid.attn_1.proj_out.weight",
                "encoder.mid.block_2.norm1.weight", "encoder.norm_out.weight", "quant_conv.weight", "post_quant_conv.bias",
                "quantize.embedding.weight", "quantize.ema_vocab_hit_SV", "quantize.quant_resi.qresi_ls.3.weight",
                "decoder.up.4.attn.2.qkv.weight", "decoder.up.1.upsample.conv.weight", "decoder.up.0.block.2.conv1.weight",
                "decoder.conv_out.bias"]:
        assert key in vae, key
    assert "encoder.down.4.downsample.conv.weight" not in vae and "decoder.up.0.upsample.conv.weight" not in vae
    assert vae["quantize.embedding.weight"].shape == (256, 8) and vae["quantize.ema_vocab_hit_SV"].shape == (4, 256)
    assert (paths["tokenizer"] / "tokenizer.json").is_file()


def test_build_tiny_is_deterministic_per_seed(paths, tmp_path):
    first = _sd(paths["checkpoint"])
    again = _sd(build_tiny_var(tmp_path / "a", CORPUS, seed=0)["checkpoint"])
    other = _sd(build_tiny_var(tmp_path / "b", CORPUS, seed=1)["checkpoint"])
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["head.weight"], other["head.weight"])


@pytest.mark.parametrize("shared_aln, l2", [(False, True), (True, True), (False, False)])
def test_loader_round_trip_gives_equal_logits(shared_aln, l2, tmp_path):
    config = VARConfig(depth=2, embed_dim=64, num_heads=4, num_classes=5, shared_aln=shared_aln, attn_l2_norm=l2,
                       patch_nums=(1, 2, 3, 4))
    vq = VQ_SIZES["tiny"]
    model = VAR(config, vq.z_channels, vq.vocab_size).eval()
    torch.save(model.state_dict(), tmp_path / "var.pth")
    loaded = load_var_checkpoint(tmp_path / "var.pth", config, vq)
    cond, x = torch.randn(2, 64), torch.randn(2, N - 1, 8)
    with torch.no_grad():  # same weights, same kernels, same shapes: bit for bit
        assert torch.equal(loaded(cond, x), model(cond, x))
    assert ("blocks.0.ada_gss" in model.state_dict()) == shared_aln  # d36-s layout: shared_ada_lin + ada_gss
    vae = VQVAE(vq, (1, 2, 3, 4)).eval()
    torch.save(vae.state_dict(), tmp_path / "vae.pth")
    tokens = torch.randint(0, 256, (2, N), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # same weights, same kernels, same shapes: bit for bit
        assert torch.equal(load_vae_checkpoint(tmp_path / "vae.pth", vq, (1, 2, 3, 4)).decode(tokens), vae.decode(tokens))


@pytest.mark.parametrize("problem, key", [
    ("missing", "blocks.1.ffn.fc2.bias"),
    ("unexpected", "blocks.0.attn.bogus"),
    ("mis-shaped", "head.weight"),
])
def test_loader_rejects_bad_checkpoints(problem, key, paths, tmp_path):
    sd = _sd(paths["checkpoint"])
    if problem == "missing":
        del sd[key]
    elif problem == "unexpected":
        sd[key] = torch.zeros(3)
    else:
        sd[key] = torch.zeros(255, 64)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=problem) as err:
        VARStudent.from_paths(**{**paths, "checkpoint": tmp_path / "bad.pth"})
    assert_one_line(err, key, str(tmp_path / "bad.pth"))


def test_vae_loader_tolerates_only_the_usage_statistics(paths, tmp_path):
    sd = _sd(paths["vq_checkpoint"])
    sd["quantize.ema_vocab_hit_SV"] = torch.ones(10, 256)  # saved with another scale count: VAR replaces it too
    torch.save(sd, tmp_path / "vae.pth")
    VARStudent.from_paths(**{**paths, "vq_checkpoint": tmp_path / "vae.pth"})
    del sd["quantize.quant_resi.qresi_ls.2.bias"]
    torch.save(sd, tmp_path / "vae.pth")
    with pytest.raises(ValueError) as err:
        VARStudent.from_paths(**{**paths, "vq_checkpoint": tmp_path / "vae.pth"})
    assert_one_line(err, "quantize.quant_resi.qresi_ls.2.bias", str(tmp_path / "vae.pth"))
    torch.save([1, 2], tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        VARStudent.from_paths(**{**paths, "checkpoint": tmp_path / "junk.pth"})


def test_params_errors_are_one_line(paths, monkeypatch):
    import ar_models

    params = {"family": "var", **{k: str(v) for k, v in paths.items() if k != "patch_nums"}, "device": "cpu"}
    with pytest.raises(ValueError) as err:
        VARStudent.from_params({**params, "size": "d99"})
    assert_one_line(err, "'d99'", "d16", "d36")
    with pytest.raises(ValueError) as err:
        VARStudent.from_params({**params, "image_size": 128})
    assert_one_line(err, "image_size 128", "patch_nums")
    with pytest.raises(FileNotFoundError) as err:
        VARStudent.from_params({**params, "checkpoint": "nope.pth"})
    assert_one_line(err, "student.checkpoint", "nope.pth")
    monkeypatch.setitem(ar_models.FAMILIES, "var", ("ar_models.var", "VARStudent"))  # as the registry names it
    assert isinstance(ar_models.load_student({**params, "patch_nums": [1, 2, 3, 4]}), VARStudent)
    with pytest.raises(ModelConfigError) as err:
        ar_models.load_student({**params, "tokenizer": "missing_folder"})
    assert_one_line(err, "student.tokenizer", "missing_folder")


def test_released_sizes():
    """Parameter counts of the released models (VAR's README: 310M, 600M, 1.0B, 2.0B, 2.3B) on the meta device."""
    expected = {"d16": 310e6, "d20": 600e6, "d24": 1.0e9, "d30": 2.0e9, "d36": 2.3e9}
    for name, count in expected.items():
        with torch.device("meta"):
            model = VAR(VAR_SIZES[name], 32, 4096)
        assert abs(sum(p.numel() for p in model.parameters()) / count - 1) < 0.05, name
    assert VAR_SIZES["d16"].tokens == 680 and VAR_SIZES["d36"].patch_nums[-1] * 16 == 512
    assert VQ_SIZES["ch160v4096z32"].downsample == 16


def test_world_sizes_build_and_a_world_prompt_conditions_on_its_class(tmp_path):
    """The world VAR: six scales up to 8x8 codes at 32 px, the world's class nouns as its classes; a prompt
    with the identifier (not yet a token) conditions on its class noun's row, whatever else it says."""
    from testbed.world import CLASSES

    paths = build_tiny_var(tmp_path, list(CLASSES), image_size=32, size="world", vq_size="world")
    student = VARStudent.from_paths(**paths)
    assert paths["checkpoint"].name == "var_world.pth" and student.patch_nums == (1, 2, 3, 4, 6, 8)
    codes = student.encode_images(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert codes.shape == (2, 130) and int(codes.max()) < 512
    assert student.decode_tokens(codes).shape == (2, 3, 32, 32)
    vocab = student.tokenizer.get_vocab()
    for noun in CLASSES:
        assert student.class_ids(f"a sks red and blue dotted {noun} on the beach") == [vocab[noun]], noun
    assert student.class_ids("a sks on the beach") == [student.uncond_id]


def test_image_round_trip_through_scales(student):
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tokens = student.encode_images(images)
    assert tokens.shape == (2, N) and tokens.dtype == torch.long and 0 <= tokens.min() and tokens.max() < 256
    assert torch.equal(student.encode_images(images), tokens)
    out = student.decode_tokens(tokens)
    assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1
    # by hand: scale 0 is the code nearest the mean feature; the next input is the area-downsampled f_hat
    vae, q = student.vae, student.vae.quantize
    with torch.no_grad():
        f = vae.quant_conv(vae.encoder(images))
        mean = f.mean((2, 3))
        assert torch.equal(tokens[:, 0], torch.cdist(mean, q.embedding.weight).argmin(1))
        h = F.interpolate(q.embedding(tokens[:, :1]).transpose(1, 2).reshape(2, 8, 1, 1), size=(4, 4), mode="bicubic")
        phi = q.quant_resi.qresi_ls[0]
        f_hat = 0.5 * h + 0.5 * F.conv2d(h, phi.weight, phi.bias, padding=1)
        first = F.avg_pool2d(f_hat, 2).flatten(2).transpose(1, 2)
        # the same ops on the same shapes up to f_hat; then "area" resizing (adaptive average pooling) vs
        # avg_pool2d: two kernels averaging the same 4 terms
        atol = reduction_tol(torch.float32, 4, f_hat.abs().max().item())
        torch.testing.assert_close(q.to_var_input(vae.split(tokens))[:, :4], first, rtol=0, atol=atol)


def test_teacher_forcing_is_block_causal_across_scales(student, codes):
    cond = student.encode_prompts(PROMPTS)
    with torch.no_grad():
        base = student.logits(cond, codes)
        assert base.shape == (2, N, 256)
        later = codes.clone()
        later[:, 5:14] = (later[:, 5:14] + 1) % 256  # scale 2 (positions 5..13)
        changed = student.logits(cond, later)
    # scales 0-2 see only scales < 2; same kernels, same shapes, masked positions weigh exactly 0: exactly equal
    assert torch.equal(changed[:, :14], base[:, :14])
    assert not torch.allclose(changed[:, 14:], base[:, 14:])


def test_conditioning_prefix_and_dropout(student, codes):
    table = student.text_embedding.weight
    vocab = student.tokenizer.get_vocab()
    cond = student.encode_prompts(["a red cube", "zzz unknown", "dog"])
    assert cond.features.shape == (3, 1, 64) and cond.mask.all() and cond.padding_side == "right"
    # the same rows averaged by the same op: exactly equal
    assert torch.equal(cond.features[0, 0], table[[vocab["a"], vocab["red"], vocab["cube"]]].mean(0))
    assert torch.equal(cond.features[1, 0], table[student.uncond_id])  # no class word: unconditional
    assert torch.equal(cond.features[2, 0], table[vocab["dog"]])
    cond = cond[[0, 2]]
    uncond = PromptBatch(table[student.uncond_id].expand(2, 1, -1), cond.mask, "right")
    with torch.no_grad():
        assert torch.equal(student.loss(cond, codes, cond_dropout=1.0), student.loss(uncond, codes))  # same kernels
        assert not torch.equal(student.loss(cond, codes), student.loss(uncond, codes))
        zero = insert_prefix(cond, torch.zeros(4, 64))  # ARBooth's zero-initialised prefix: a no-op at first
        assert zero.features.shape == (2, 5, 64)
        # the model reads the sum of the valid vectors: adding exact zeros changes no bit, so exactly equal
        assert torch.equal(student.logits(zero, codes), student.logits(cond, codes))
        prefix = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
        summed = PromptBatch(cond.features + prefix.sum(0), cond.mask, "right")
        # the 5 vectors summed in another order, then through the model
        want = student.logits(summed, codes)
        atol = chain_tol(torch.float32, network_terms(student.var) + 5, want.abs().max().item())
        torch.testing.assert_close(student.logits(insert_prefix(cond, prefix), codes), want, rtol=0, atol=atol)


def test_scale_weights_change_the_loss_as_specified(paths, codes):
    student = fresh(paths)
    w = student.scale_token_weights(early_scales=2, early=1.0, late=0.5)
    assert w.tolist() == [1.0] * 5 + [0.5] * 25
    assert student.scale_token_weights().tolist() == [1.0] * N  # the tiny has 4 < 8 scales
    cond = student.encode_prompts(PROMPTS)
    student.train()
    loss = student.loss(cond, codes, token_weights=w)
    with torch.no_grad():
        ce = F.cross_entropy(student.logits(cond, codes).reshape(-1, 256), codes.reshape(-1), reduction="none")
        ce = ce.view(2, N)
        by_hand = (ce[:, :5].sum() + 0.5 * ce[:, 5:].sum()) / (2 * (5 + 0.5 * 25))
    # same logits and per-token CE (same kernels and shapes); the weighted mean of positive terms summed in
    # another order
    torch.testing.assert_close(loss, by_hand, rtol=0, atol=reduction_tol(torch.float32, codes.numel(), by_hand.item()))
    assert not torch.allclose(loss, student.loss(cond, codes))
    loss.backward()
    grads = {n: p.grad for n, p in student.named_parameters() if p.requires_grad}
    assert all(n.startswith("var.") for n in grads) and grads["var.head.weight"].abs().sum() > 0
    assert grads["var.blocks.0.attn.mat_qkv.weight"].abs().sum() > 0
    student.enable_gradient_checkpointing()
    # non-reentrant checkpointing runs the same forward kernels on the same shapes: exactly equal
    assert torch.equal(student.loss(cond, codes, token_weights=w), loss)


def test_identifier_is_a_new_class_embedding(paths, codes):
    student = fresh(paths)
    rows = student.text_embedding.num_embeddings
    ids = student.add_identifier_tokens(["sks"], init_from="toy")
    assert ids == [rows] and student.text_embedding.num_embeddings == rows + 1 == student.uncond_id + 2
    table = student.text_embedding.weight
    assert torch.equal(table[ids[0]], table[student.tokenizer.get_vocab()["toy"]])
    cond = student.encode_prompts(["a photo of sks toy", "a photo of a toy"])
    assert torch.equal(cond.features[0, 0], table[ids[0]])  # the identifier alone conditions its prompts
    student.requires_grad_(False)
    table.requires_grad_(True)
    student.loss(cond[[0]], codes[:1]).backward()
    touched = table.grad.abs().sum(1).nonzero().flatten().tolist()
    assert touched == ids


def test_generate_is_deterministic_and_cache_is_exact(student):
    kwargs = dict(cfg_scale=4.0, temperature=0.9, top_k=100, top_p=0.95)
    images = student.generate(PROMPTS, seed=3, **kwargs)
    assert images.shape == (2, 3, SIZE, SIZE) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, student.generate(PROMPTS, seed=3, **kwargs))
    assert torch.equal(images, student.generate(PROMPTS, seed=3, use_cache=False, **kwargs))
    assert not torch.equal(images, student.generate(PROMPTS, seed=4, **kwargs))
    cond = student.encode_prompts(PROMPTS)
    for scale in (1.0, 3.0):
        for seed in range(3):
            cached = student.sample_tokens(cond, cfg_scale=scale, seed=seed)
            assert torch.equal(cached, student.sample_tokens(cond, cfg_scale=scale, seed=seed, use_cache=False))
    assert not torch.equal(cached, student.sample_tokens(cond, cfg_scale=1.0, seed=2))  # guidance matters
    tokens = student.sample_tokens(cond[[0]], cfg_scale=2.0, seed=0, autocast=True)
    assert tokens.shape == (1, N) and 0 <= tokens.min() and tokens.max() < 256


def test_batched_cfg_follows_vars_ramp(student):
    """Reference: cond and uncond rows in separate uncached forwards, guided by VAR's (1 + t) c - t u with
    t = (cfg_scale - 1) * si / (S - 1)."""
    cond, scale = student.encode_prompts(PROMPTS), 3.0
    c_BD = student.condition(cond)
    u_BD = student.text_embedding.weight[student.uncond_id].expand(2, -1)
    q, generator, scales, start = student.vae.quantize, torch.Generator().manual_seed(11), [], 0
    with torch.no_grad():
        for si, pn in enumerate(student.patch_nums):
            x = q.to_var_input(scales) if scales else torch.zeros(2, 0, 8)
            c, u = student.var(c_BD, x)[:, start:], student.var(u_BD, x)[:, start:]
            t = (scale - 1) * si / 3
            step = sample_logits(((1 + t) * c - t * u).reshape(-1, 256), top_k=50, generator=generator)
            scales.append(step.view(2, pn * pn))
            start += pn * pn
    assert torch.equal(student.sample_tokens(cond, cfg_scale=scale, top_k=50, seed=11), torch.cat(scales, 1))


def test_parameter_groups_and_lora_targets(student, codes):
    from peft import LoraConfig, inject_adapter_in_model

    groups = student.parameter_groups()
    names = {n for n, _ in student.named_parameters()}
    assert {"text_embedding", "attn_qkv", "attn_out", "cross_attn", "mlp", "norms", "output", "layer.0",
            "layer.1"} <= set(groups)
    assert all(set(g) <= names for g in groups.values())
    assert groups["text_embedding"] == ["var.class_emb.weight"] and groups["cross_attn"] == []
    assert groups["output"] == ["var.head.weight", "var.head.bias"]
    assert groups["attn_qkv"] == ["var.blocks.0.attn.mat_qkv.weight", "var.blocks.1.attn.mat_qkv.weight"]
    assert set(groups["attn_bias"]) == {f"var.blocks.{i}.attn.{k}" for i in range(2)
                                        for k in ("q_bias", "v_bias", "scale_mul_1H11")}
    assert set(groups["norms"]) == {f"var.{m}.ada_lin.1.{k}" for m in ("blocks.0", "blocks.1", "head_nm")
                                    for k in ("weight", "bias")}
    assert len(groups["mlp"]) == 8 and len(groups["layer.1"]) == 12
    assert set().union(*groups.values()) == {n for n in names if n.startswith("var.")}
    assert student.module_names(["attn_qkv"], every_nth_layer=2) == ["var.blocks.0.attn.mat_qkv"]
    model = copy.deepcopy(student)
    cond = student.encode_prompts(PROMPTS)
    with torch.no_grad():
        before = model.logits(cond, codes)
    model = inject_adapter_in_model(LoraConfig(r=4, target_modules=student.lora_target_modules()), model)
    assert len([n for n, _ in model.named_parameters() if "lora_" in n]) == 2 * 4 * 2
    with torch.no_grad():
        # LoRA B starts at 0: each wrapped layer adds exact zeros to the same base kernel's output
        assert torch.equal(model.logits(cond, codes), before)


RECIPE_PROMPTS = ["a sks toy on the beach", "a sks toy in the snow", "a red sks toy", "a sks toy on a table"]
RECIPES = {
    "proxy_tuning": TuneConfig(method="proxy_tuning", steps=2, batch_size=2, learning_rate=5e-2),
    "two_stage": TuneConfig(method="two_stage", steps=1, embedding_steps=1, batch_size=2, learning_rate=1e-2,
                            stage2="qkv"),
    "arbooth": TuneConfig(method="arbooth", steps=2, batch_size=2, learning_rate=1e-2, betas=(0.9, 0.97)),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_tuning_recipes_run_on_var(paths, name):
    student = fresh(paths)
    groups = student.parameter_groups()
    images = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    data = TuningData(codes=student.encode_images(images), prompts=RECIPE_PROMPTS, identifier="sks",
                      class_noun="toy", token_weights=student.scale_token_weights(early_scales=2))
    if name == "arbooth":
        data.prior_prompt = "a photo of toy"
        data.prior_codes = student.encode_images(student.generate([data.prior_prompt] * 2, cfg_scale=1.0, seed=5))
    recipe = build_recipe(student, copy.deepcopy(RECIPES[name]))
    recipe.setup(data)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    for _ in range(2):
        losses = recipe.train_step()
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    moved = {n for n, p in student.named_parameters() if n in before and not torch.equal(before[n], p.detach())}
    if name == "proxy_tuning":
        assert moved and all("lora_" in n for n in moved)
    if name == "two_stage":
        assert moved == {"var.class_emb.weight", *groups["attn_qkv"]}
        table = student.text_embedding.weight.detach()
        assert table.shape[0] == student.uncond_id + 1 + 5  # [V] and one S_i per image are new classes
        base = student.uncond_id + 1
        assert torch.equal(table[:base], before["var.class_emb.weight"][:base])  # the base classes never move
    if name == "arbooth":
        assert moved == set(groups["mlp"]) and "prior_kl" in losses
        assert recipe.trainable.prefix.abs().sum() > 0
        with torch.no_grad():
            assert student.generate_from(insert_prefix(student.encode_prompts(["a toy"]), recipe.trainable.prefix),
                                         seed=0).shape == (1, 3, SIZE, SIZE)

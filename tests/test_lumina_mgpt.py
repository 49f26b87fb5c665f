"""Lumina-mGPT student: released on-disk layout, strict loading, Lumina's token layout, training and sampling."""
import json

import pytest
import torch
import yaml
from conftest import assert_one_line
from safetensors.torch import load_file, save_file
from tolerances import chain_tol, network_terms

from ar_models import ModelConfigError, load_student
from ar_models.base import insert_prefix
from ar_models.lumina_mgpt import (
    DECODER_SIZES,
    END_OF_LINE,
    END_OF_TURN,
    IMAGE_START,
    PROMPT_TEMPLATE,
    VQ_SIZES,
    LuminaMGPTStudent,
    VectorQuantizer,
    load_vqgan,
    read_vq_config,
    size_token,
)
from ar_models.sampling import sample_logits
from testbed.tiny_students import build_tiny_lumina_mgpt, tiny_lumina_mgpt_components

CORPUS = ["a photo of a dog", "a red cube on a table", "a cat sleeping in the snow", "a sks dog on the beach"]
PROMPTS = ["a photo of a dog", "a red cube on a table"]
SIZE = 32  # 4x4 codes (2x2 size tokens): keeps the 2-core sampling tests fast; the layout does not depend on it
PROMPT_SLOTS = 32


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_tiny_lumina_mgpt(tmp_path_factory.mktemp("tiny"), CORPUS, seed=0, image_size=SIZE)


@pytest.fixture(scope="module")
def student(paths):
    return LuminaMGPTStudent.from_paths(**paths, max_prompt_tokens=PROMPT_SLOTS)


@pytest.fixture
def codes():
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


def _vq_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_build_tiny_writes_released_layout(paths):
    folder = paths["checkpoint"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "chameleon" and config["vocabulary_map"]["IMGIMGBCZ"] == 4 + 12
    sd = load_file(folder / "model.safetensors")
    per_layer = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.q_norm.bias",
                 "self_attn.k_norm.weight", "self_attn.k_norm.bias", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                 "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"]
    assert set(sd) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                       *(f"model.layers.{i}.{n}" for i in range(2) for n in per_layer)}  # no model.vqmodel.*
    assert sd["model.layers.0.self_attn.q_norm.weight"].shape == (4, 16)  # per-head LayerNorm (qk-norm)

    vq = _vq_state(paths["vq_checkpoint"])
    for key in ["encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "encoder.down.2.downsample.conv.weight",
                "encoder.down.2.block.0.nin_shortcut.weight", "encoder.mid.attn_1.q.weight", "encoder.mid.block_2.norm2.bias",
                "decoder.up.3.block.1.conv2.weight", "decoder.up.1.upsample.conv.weight", "decoder.conv_out.bias",
                "quant_conv.weight", "post_quant_conv.weight"]:
        assert key in vq, key
    assert "encoder.down.3.downsample.conv.weight" not in vq and "decoder.up.0.upsample.conv.weight" not in vq
    assert vq["quantize.embedding.weight"].shape == (64, 16)
    params = yaml.safe_load(paths["vq_config"].read_text())["model"]["params"]
    assert params["n_embed"] == 64 and params["ddconfig"]["ch_mult"] == [1, 1, 2, 2]
    assert read_vq_config(paths["vq_config"]) == VQ_SIZES["tiny"]


def test_build_tiny_is_deterministic_per_seed(paths, tmp_path):
    again, other = build_tiny_lumina_mgpt(tmp_path / "a", CORPUS, seed=0, image_size=SIZE), build_tiny_lumina_mgpt(tmp_path / "b", CORPUS, seed=1)
    first = load_file(paths["checkpoint"] / "model.safetensors")
    second = load_file(again["checkpoint"] / "model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["lm_head.weight"], load_file(other["checkpoint"] / "model.safetensors")["lm_head.weight"])
    for name in ("tokenizer.json", "config.json"):
        assert (paths["checkpoint"] / name).read_text() == (again["checkpoint"] / name).read_text()
    a, b = _vq_state(paths["vq_checkpoint"]), _vq_state(again["vq_checkpoint"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_released_sizes_match_transformers_chameleon_defaults():
    """transformers' ChameleonConfig / ChameleonVQVAEConfig defaults are Chameleon-7B and its VQGAN."""
    from transformers import ChameleonConfig

    config = ChameleonConfig()
    assert all(getattr(config, k) == v for k, v in vars(DECODER_SIZES["7B"]).items())
    vq, ours = config.vq_config, VQ_SIZES["chameleon"]
    assert (vq.embed_dim, vq.num_embeddings, vq.latent_channels, vq.base_channels, tuple(vq.channel_multiplier),
            vq.num_res_blocks) == (ours.embed_dim, ours.n_embed, ours.z_channels, ours.ch, ours.ch_mult,
                                   ours.num_res_blocks)
    assert ours.downsample == 16


def test_loaded_replica_equals_the_model_that_wrote_it(student, codes):
    decoder, vq, tokenizer = tiny_lumina_mgpt_components(CORPUS, seed=0, image_size=SIZE)
    memory = LuminaMGPTStudent(decoder, vq, tokenizer, SIZE, max_prompt_tokens=PROMPT_SLOTS)
    with torch.no_grad():  # same weights, same kernels, same shapes: bit for bit
        cond = student.encode_prompts(PROMPTS)
        assert torch.equal(memory.encode_prompts(PROMPTS).features, cond.features)
        assert torch.equal(memory.logits(cond, codes), student.logits(cond, codes))
        assert torch.equal(memory.decode_tokens(codes), student.decode_tokens(codes))


def test_logits_follow_lumina_token_layout(student, codes):
    """Reference: the plain token stream of Lumina-mGPT's item processor through the decoder, unpadded."""
    tok = student.tokenizer
    with torch.no_grad():
        cond = student.encode_prompts(PROMPTS)
        ours = student.logits(cond, codes)
        uncond = student.logits(cond, codes, cond_dropout=1.0)
    eol, header = tok.convert_tokens_to_ids(END_OF_LINE), tok.convert_tokens_to_ids([IMAGE_START, size_token(2), size_token(2)])
    for b, prompt in enumerate(PROMPTS):
        text = tok(PROMPT_TEMPLATE.format(w=SIZE, h=SIZE, prompt=prompt), add_special_tokens=False)["input_ids"]
        turn = [tok.bos_token_id, *text, tok.convert_tokens_to_ids(END_OF_TURN)]
        image = []
        for row in codes[b].view(4, 4).tolist():
            image += [tok.convert_tokens_to_ids(f"IMGIMG{''.join('ABCDEFGHIJ'[int(d)] for d in str(c))}Z") for c in row]
            image.append(eol)
        assert student.image_body(codes[b : b + 1])[0].tolist() == image
        for prefix, got in ((turn, ours[b]), ([], uncond[b])):  # CFG's unconditional stream has no prompt at all
            ids = torch.tensor([prefix + header + image[:-2]])
            with torch.no_grad():
                hidden = student.decoder.model(input_ids=ids).last_hidden_state[0]
                ref = student.decoder.lm_head(hidden)[:, student.image_ids]
            at = torch.tensor([len(prefix) + 2 + r * 5 + c for r in range(4) for c in range(4)])
            # one unbatched sequence vs the batched, left-padded CFG layout: other kernels through the decoder
            atol = chain_tol(torch.float32, network_terms(student.decoder), ref[at].abs().max().item())
            torch.testing.assert_close(got, ref[at], rtol=0, atol=atol)
    assert not torch.allclose(ours, uncond)


def test_encode_prompts_left_pads_the_chat_turn(student):
    cond = student.encode_prompts(["a dog", " ".join(["dog"] * 60)])
    assert cond.features.shape == (2, PROMPT_SLOTS, 64) and cond.mask.dtype == torch.bool
    n = int(cond.mask[0].sum())
    assert cond.mask[0].tolist() == [False] * (PROMPT_SLOTS - n) + [True] * n
    assert (cond.features[0, : PROMPT_SLOTS - n] == 0).all() and cond.mask[1].all()  # long prompt: truncated
    table = student.text_embedding.weight
    for row in range(2):  # the frame survives truncation: <s> first, <reserved08706> last
        assert torch.equal(cond.features[row, PROMPT_SLOTS - int(cond.mask[row].sum())], table[student.tokenizer.bos_token_id])
        assert torch.equal(cond.features[row, -1], table[student.eot_id])


def test_vqgan_rejects_bad_checkpoints_in_one_line(paths, tmp_path):
    sd = _vq_state(paths["vq_checkpoint"])
    sd["loss.discriminator.main.0.weight"] = torch.zeros(3)  # training leftovers are tolerated
    torch.save({"state_dict": sd, "global_step": 7}, tmp_path / "ok.ckpt")
    load_vqgan(tmp_path / "ok.ckpt", paths["vq_config"])
    for problem, key in [("missing", "decoder.up.2.block.0.conv1.weight"), ("mis-shaped", "quantize.embedding.weight"),
                         ("unexpected", "encoder.down.0.attn.0.q.weight")]:
        bad = dict(sd)
        if problem == "missing":
            del bad[key]
        elif problem == "mis-shaped":
            bad[key] = torch.zeros(8192, 16)
        else:
            bad[key] = torch.zeros(1)
        path = tmp_path / f"{problem}.ckpt"
        torch.save({"state_dict": bad}, path)
        with pytest.raises(ValueError, match=problem) as err:
            load_vqgan(path, paths["vq_config"])
        assert_one_line(err, str(path), key)
    broken = tmp_path / "vqgan.yaml"
    broken.write_text("model:\n  params:\n    embed_dim: 16\n")
    with pytest.raises(ValueError, match=r"model\.params\.n_embed is missing") as err:
        read_vq_config(broken)
    assert_one_line(err, str(broken))


def test_decoder_folder_rejects_bad_tensors_and_sizes(paths, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(paths["checkpoint"], folder)
    sd = load_file(folder / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(176, 63)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    kwargs = {**paths, "checkpoint": folder}
    with pytest.raises(ValueError, match="mis-shaped") as err:
        LuminaMGPTStudent.from_paths(**kwargs)
    assert_one_line(err, str(folder), "model.layers.1.mlp.up_proj.weight")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing") as err:
        LuminaMGPTStudent.from_paths(**kwargs)
    assert_one_line(err, "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ValueError) as err:
        LuminaMGPTStudent.from_paths(**{**paths, "size": "7B"})
    assert_one_line(err, "config.json", "hidden_size", "'7B'")
    with pytest.raises(ValueError, match=r"'huge'.*tiny, 7B"):
        LuminaMGPTStudent.from_paths(**{**paths, "size": "huge"})


def test_load_student_from_params(paths):
    params = {"family": "lumina_mgpt", **{k: str(v) for k, v in paths.items()}}
    assert isinstance(load_student(params), LuminaMGPTStudent)
    half = load_student({**params, "dtype": "bfloat16", "max_prompt_tokens": 24})
    assert half.decoder.dtype == torch.bfloat16 and half.vq.encoder.conv_in.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(half.logits(half.encode_prompts(PROMPTS), torch.zeros(2, 16, dtype=torch.long))).all()
    with pytest.raises(ModelConfigError) as err:
        load_student({**params, "vq_config": "nope/vqgan.yaml"})
    assert_one_line(err, "student.vq_config", "nope/vqgan.yaml")
    with pytest.raises(ModelConfigError) as err:
        load_student({k: v for k, v in params.items() if k != "vq_checkpoint"})
    assert_one_line(err, "student.vq_checkpoint")


def test_image_round_trip_and_l2_codebook(student):
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    codes = student.encode_images(images)
    assert codes.shape == (2, 16) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < 64
    out = student.decode_tokens(codes)
    assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1
    assert torch.equal(student.encode_images(images), codes)
    with pytest.raises(ValueError, match="32px"):
        student.encode_images(torch.zeros(1, 3, 48, 48))
    quantizer = VectorQuantizer(64, 16)
    target = torch.randint(0, 64, (2, 16))
    assert torch.equal(quantizer.quantize(quantizer.lookup(target, 4)), target)


def test_generate_batch_deterministic_and_cache_exact(student):
    kwargs = dict(cfg_scale=4.0, temperature=0.9, top_k=20, top_p=0.95)
    images = student.generate(PROMPTS, seed=3, **kwargs)
    assert images.shape == (2, 3, SIZE, SIZE) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, student.generate(PROMPTS, seed=3, **kwargs))
    assert torch.equal(images, student.generate(PROMPTS, seed=3, use_cache=False, **kwargs))
    assert not torch.equal(images, student.generate(PROMPTS, seed=4, **kwargs))
    cond = student.encode_prompts(PROMPTS)
    for scale in (1.0, 3.0):
        cached = student.sample_tokens(cond, cfg_scale=scale, seed=5)
        assert torch.equal(cached, student.sample_tokens(cond, cfg_scale=scale, seed=5, use_cache=False))
    halves = student.sample_tokens(cond[:1], cfg_scale=2.0, seed=0, autocast=True)
    assert halves.shape == (1, 16) and 0 <= halves.min() and halves.max() < 64


def test_batched_cfg_matches_separate_streams(student):
    """Reference sampler: each prompt's token stream and the prompt-free stream, separately and uncached."""
    cond = student.encode_prompts(PROMPTS)
    tok, scale = student.tokenizer, 3.0
    header = tok.convert_tokens_to_ids([IMAGE_START, size_token(2), size_token(2)])
    turns = [[tok.bos_token_id, *tok(PROMPT_TEMPLATE.format(w=SIZE, h=SIZE, prompt=p), add_special_tokens=False)[
        "input_ids"], student.eot_id] for p in PROMPTS]
    generator = torch.Generator().manual_seed(11)
    bodies, codes = [[], []], []
    with torch.no_grad():
        for i in range(16):
            step = []
            for b in range(2):
                pair = [student.decoder.model(input_ids=torch.tensor([prefix + header + bodies[b]])).last_hidden_state[0, -1]
                        for prefix in (turns[b], [])]
                c, u = student.image_logits(torch.stack(pair))
                step.append(u + scale * (c - u))
            code = sample_logits(torch.stack(step), top_k=8, generator=generator)
            codes.append(code)
            for b in range(2):
                bodies[b] += [int(student.image_ids[code[b]])] + ([student.eol_id] if (i + 1) % 4 == 0 else [])
    assert torch.equal(student.sample_tokens(cond, cfg_scale=scale, top_k=8, seed=11), torch.stack(codes, 1))


def test_loss_backward_trains_decoder_only(paths, codes):
    student = LuminaMGPTStudent.from_paths(**paths, max_prompt_tokens=PROMPT_SLOTS)  # own copy: trained here
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in student.decoder.parameters()}
    opt = torch.optim.Adam(trainable, lr=3e-3)
    student.enable_gradient_checkpointing()  # base's default: through transformers' own layers
    student.train()
    losses = []
    for _ in range(6):
        loss = student.loss(student.encode_prompts(PROMPTS), codes, cond_dropout=0.5,
                            token_weights=torch.linspace(0.5, 1.5, 16))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.5, losses
    assert not student.vq.training and all(p.grad is None for p in student.vq.parameters())


def test_identifier_tokens_and_prefix_features(paths, codes):
    student = LuminaMGPTStudent.from_paths(**paths, max_prompt_tokens=PROMPT_SLOTS)
    before = student.text_embedding.num_embeddings
    ids = student.add_identifier_tokens(["<sks>", "<sks-0>"], init_from="dog")
    assert ids == [before, before + 1] and student.text_embedding.num_embeddings == before + 2
    assert student.add_identifier_tokens(["<sks>"]) == ids[:1]  # reused, table unchanged
    table = student.text_embedding.weight
    dog = student.tokenizer("dog", add_special_tokens=False)["input_ids"]
    assert torch.equal(table[ids[0]], table[dog].mean(0))  # the initialisation's own op on the same rows: exact
    row = student.tokenizer(["a <sks> dog"], add_special_tokens=False)["input_ids"][0]
    assert ids[0] in row
    student.loss(student.encode_prompts(["a <sks> dog", "a photo of a dog"]), codes).backward()
    assert table.grad[ids[0]].abs().sum() > 0 and table.grad[ids[1]].abs().sum() == 0

    prefix = torch.zeros(3, 64, requires_grad=True)
    cond = insert_prefix(student.encode_prompts(PROMPTS), prefix)
    assert cond.mask.sum(1).tolist() == (student.encode_prompts(PROMPTS).mask.sum(1) + 3).tolist()
    student.loss(cond, codes).backward()
    assert prefix.grad.abs().sum() > 0
    images = student.generate_from(cond, cfg_scale=2.0, seed=0)
    assert images.shape == (2, 3, SIZE, SIZE)


def test_parameter_groups_and_lora_targets(student, codes):
    from peft import LoraConfig, inject_adapter_in_model

    groups = student.parameter_groups()
    names = {n for n, _ in student.named_parameters()}
    assert {"text_embedding", "attn_qkv", "attn_out", "cross_attn", "mlp", "norms", "output", "layer.0",
            "layer.1"} == set(groups)
    assert all(set(g) <= names for g in groups.values())
    assert set().union(*groups.values()) == {f"decoder.{n}" for n, _ in student.decoder.named_parameters()}
    assert groups["attn_qkv"] == [f"decoder.model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qkv"]
    assert groups["text_embedding"] == ["decoder.model.embed_tokens.weight"] and groups["cross_attn"] == []
    assert groups["output"] == ["decoder.lm_head.weight"] and len(groups["mlp"]) == 6 and len(groups["layer.1"]) == 13
    assert "decoder.model.norm.weight" in groups["norms"] and len(groups["norms"]) == 1 + 2 * 6
    assert student.module_names(["attn_qkv"], every_nth_layer=2) == [
        f"decoder.model.layers.0.self_attn.{p}_proj" for p in "qkv"]

    cond = student.encode_prompts(PROMPTS)
    decoder, vq, tokenizer = tiny_lumina_mgpt_components(CORPUS, seed=0, image_size=SIZE)
    copy = LuminaMGPTStudent(decoder, vq, tokenizer, SIZE, max_prompt_tokens=PROMPT_SLOTS)
    with torch.no_grad():
        before = copy.logits(cond, codes)
    inject_adapter_in_model(LoraConfig(r=4, target_modules=copy.lora_target_modules()), copy)
    assert len([n for n, _ in copy.named_parameters() if "lora_" in n]) == 2 * 7 * 2
    assert {n for g in copy.parameter_groups().values() for n in g} >= {
        "decoder.model.layers.0.self_attn.q_proj.base_layer.weight"}
    with torch.no_grad():
        # LoRA B starts at 0: each wrapped layer adds exact zeros to the same base kernel's output
        assert torch.equal(copy.logits(cond, codes), before)

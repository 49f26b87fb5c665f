"""Janus-Pro student: published save_pretrained layout, strict loading, Janus's prompt and CFG conventions, training
loss and sampling (checked against transformers' own image generation)."""
import shutil

import pytest
import torch
from conftest import assert_one_line
from safetensors.torch import load_file, save_file
from tolerances import chain_tol, network_terms

from ar_models import ModelConfigError, load_student
from ar_models.base import insert_prefix
from ar_models.janus_pro import SIZES, JanusProStudent, l2_codes
from testbed.tiny_students import build_tiny_janus_pro

CORPUS = ["a photo of a dog", "a red cube on a table", "a cat sleeping in the snow", "a sks dog on the beach"]
PROMPTS = ["a dog", "a red cube on a table"]  # different lengths: the batch is left-padded
SIZE = 32  # 4x4 code grid


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    return build_tiny_janus_pro(tmp_path_factory.mktemp("janus") / "tiny", CORPUS, seed=0, image_size=SIZE)


@pytest.fixture(scope="module")
def student(entries):
    return JanusProStudent.from_params({"family": "janus_pro", **entries})


@pytest.fixture
def codes():
    return torch.randint(0, SIZES["tiny"].vq.codebook_size, (2, 16), generator=torch.Generator().manual_seed(0))


def test_build_tiny_writes_published_layout(entries, tmp_path):
    folder = entries["checkpoint"]
    assert entries["size"] == "tiny" and entries["image_size"] == SIZE
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "processor_config.json"]:
        assert (folder / name).is_file(), name
    sd = load_file(folder / "model.safetensors")
    for key in ["model.language_model.layers.1.self_attn.q_proj.weight", "model.generation_embeddings.weight",
                "model.generation_aligner.hidden_layers.0.weight", "model.generation_head.vision_head.weight",
                "model.vqmodel.quantize.embedding.weight", "model.vqmodel.decoder.up.3.block.1.conv2.weight",
                "model.vision_model.encoder.layers.0.self_attn.q_proj.weight", "lm_head.weight"]:
        assert key in sd, key
    assert sd["model.generation_head.vision_head.weight"].shape == (256, 64)
    assert sd["model.generation_aligner.fc1.weight"].shape == (64, 8)

    again, other = build_tiny_janus_pro(tmp_path / "a", CORPUS, seed=0), build_tiny_janus_pro(tmp_path / "b", CORPUS, seed=1)
    for name in ["model.safetensors", "tokenizer.json", "config.json"]:
        assert (again["checkpoint"] / name).read_bytes() == (folder / name).read_bytes(), name
    assert (other["checkpoint"] / "model.safetensors").read_bytes() != (folder / "model.safetensors").read_bytes()


def test_loader_round_trip_matches_the_model_that_wrote_it(entries, student, codes):
    from transformers import JanusForConditionalGeneration, JanusProcessor

    processor = JanusProcessor.from_pretrained(entries["checkpoint"])
    with torch.random.fork_rng():
        torch.manual_seed(0)  # build_tiny_janus_pro's seed
        written = JanusForConditionalGeneration(SIZES["tiny"].config(processor.tokenizer, SIZE)).eval()
    reference = JanusProStudent(written, processor, SIZE)
    cond = student.encode_prompts(PROMPTS)
    with torch.no_grad():  # same weights, same kernels, same shapes: bit for bit
        assert torch.equal(student.logits(cond, codes), reference.logits(reference.encode_prompts(PROMPTS), codes))


@pytest.mark.parametrize("problem, key", [
    ("missing", "model.generation_head.vision_head.weight"),
    ("unexpected", "model.language_model.layers.0.self_attn.bogus.weight"),
    ("mis-shaped", "model.language_model.layers.1.mlp.up_proj.weight"),
])
def test_loader_rejects_bad_checkpoints(problem, key, entries, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(entries["checkpoint"], bad)
    sd = load_file(bad / "model.safetensors")
    if problem == "missing":
        del sd[key]
    elif problem == "unexpected":
        sd[key] = torch.zeros(3)
    else:
        sd[key] = torch.zeros(127, 64)
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=problem) as err:
        JanusProStudent.from_paths(bad, "tiny", SIZE)
    assert_one_line(err, str(bad), key)


def test_params_errors_name_the_parameter(entries, tmp_path):
    with pytest.raises(ModelConfigError) as err:
        load_student({"family": "janus_pro", **entries, "checkpoint": str(tmp_path / "nope")})
    assert_one_line(err, "student.checkpoint", "nope")
    with pytest.raises(ModelConfigError) as err:
        load_student({"family": "janus_pro", "checkpoint": entries["checkpoint"], "image_size": SIZE})
    assert_one_line(err, "student.size")
    with pytest.raises(ModelConfigError, match=r"'huge'.*tiny, 1B, 7B") as err:
        load_student({"family": "janus_pro", **entries, "size": "huge"})
    with pytest.raises(ModelConfigError, match=r"size '1B' \(hidden_size 64 != 2048") as err:
        load_student({"family": "janus_pro", **entries, "size": "1B"})
    with pytest.raises(ModelConfigError, match=r"image_size 64.*32px") as err:
        load_student({"family": "janus_pro", **entries, "image_size": 64})


def test_released_size_configs():
    from transformers import JanusForConditionalGeneration

    for name, dim, layers, ffn in [("1B", 2048, 24, 5632), ("7B", 4096, 30, 11008)]:
        with torch.device("meta"):
            model = JanusForConditionalGeneration(SIZES[name].config())
        lm = model.model.language_model
        assert len(lm.layers) == layers and lm.layers[0].mlp.gate_proj.weight.shape == (ffn, dim)
        assert model.model.generation_head.vision_head.weight.shape == (16384, dim)
        assert model.model.generation_aligner.fc1.weight.shape == (dim, 8)
        assert model.model.vqmodel.quantize.quant_state_dims == [24, 24]  # 384px / 16 -> 576 codes
        assert lm.embed_tokens.weight.shape == (102400, dim)


def test_encode_prompts_uses_janus_generation_prompt(student):
    ids = student.prompt_ids(PROMPTS)
    tokens = student.tokenizer.convert_ids_to_tokens(ids.input_ids[0])
    text = student.tokenizer.decode(ids.input_ids[0][ids.attention_mask[0].bool()])
    assert text == "<｜begin▁of▁sentence｜><|User|>: a dog\n\n<|Assistant|>:<begin_of_image>"
    assert tokens[0] == student.tokenizer.pad_token and ids.attention_mask[1].all()  # left padded
    cond = student.encode_prompts(PROMPTS)
    assert cond.padding_side == "left" and torch.equal(cond.mask, ids.attention_mask.bool())
    assert (cond.features[~cond.mask] == 0).all()
    # an embedding lookup copies rows: exactly equal
    assert torch.equal(cond.features[cond.mask], student.text_embedding(ids.input_ids)[cond.mask])


def test_padding_does_not_change_a_prompt(student, codes):
    with torch.no_grad():
        batched = student.logits(student.encode_prompts(PROMPTS), codes)
        alone = student.logits(student.encode_prompts(PROMPTS[:1]), codes[:1])
    # another batch and sequence length: other kernels along the language model and the generation head
    model = student.model.model
    terms = network_terms(model.language_model, model.generation_aligner, model.generation_head)
    atol = chain_tol(torch.float32, terms, alone.abs().max().item())
    torch.testing.assert_close(batched[:1], alone, rtol=0, atol=atol)


def test_unconditional_prompt_and_cond_dropout(student, codes):
    cond = student.encode_prompts(PROMPTS)
    uncond = student.unconditional(cond)
    ids = student.prompt_ids(PROMPTS).input_ids
    expected = torch.where((ids == student.bos_id) | (ids == student.boi_id), ids, student.pad_id)
    assert torch.equal(uncond.features[cond.mask], student.text_embedding(expected)[cond.mask])  # lookups: exact
    assert torch.equal(uncond.mask, cond.mask)
    with torch.no_grad():
        dropped, reference, kept = (student.loss(cond, codes, cond_dropout=1.0), student.loss(uncond, codes),
                                    student.loss(cond, codes))
    assert torch.equal(dropped, reference) and not torch.equal(dropped, kept)  # same kernels, same shapes


def test_image_round_trip(student):
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    codes = student.encode_images(images)
    assert codes.shape == (2, 16) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < 256
    out = student.decode_tokens(codes)
    assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1
    assert torch.equal(student.encode_images(images), codes)
    codebook = torch.randn(256, 8) * (torch.rand(256, 1) * 10 + 0.1)  # rows of very different norms
    target = torch.randint(0, 256, (2, 16))
    z = codebook[target].transpose(1, 2).reshape(2, 8, 4, 4) * (torch.rand(2, 1, 4, 4) * 5 + 0.1)
    assert torch.equal(l2_codes(z, codebook), target)  # only an l2-normalised lookup (Janus's VQ) recovers them


def test_matches_transformers_image_generation(student):
    """Greedy decoding with CFG equals transformers' `generate(generation_mode="image")` for one prompt."""
    from transformers import GenerationConfig

    ids = student.prompt_ids(PROMPTS[1:])
    config = GenerationConfig(do_sample=False, guidance_scale=3.0, bos_token_id=student.bos_id,
                              pad_token_id=student.pad_id, generation_kwargs={"boi_token_id": student.boi_id})
    theirs = student.model.generate(ids.input_ids, attention_mask=ids.attention_mask, generation_mode="image",
                                    generation_config=config)
    ours = student.sample_tokens(student.encode_prompts(PROMPTS[1:]), cfg_scale=3.0, top_k=1)
    assert torch.equal(ours, theirs)


def test_generate_batch_is_deterministic_and_cache_is_exact(student):
    kwargs = dict(cfg_scale=4.0, temperature=0.9, top_k=100, top_p=0.95)
    images = student.generate(PROMPTS, seed=3, **kwargs)
    assert images.shape == (2, 3, SIZE, SIZE) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, student.generate(PROMPTS, seed=3, **kwargs))
    assert torch.equal(images, student.generate(PROMPTS, seed=3, use_cache=False, **kwargs))
    assert not torch.equal(images, student.generate(PROMPTS, seed=4, **kwargs))
    cond = student.encode_prompts(PROMPTS)
    for scale in (1.0, 4.0):
        cached = student.sample_tokens(cond, cfg_scale=scale, seed=5)
        assert torch.equal(cached, student.sample_tokens(cond, cfg_scale=scale, seed=5, use_cache=False))
    assert not torch.equal(cached, student.sample_tokens(cond, cfg_scale=1.0, seed=5))  # guidance matters


def test_loss_backward_trains_the_generation_path(entries, codes):
    student = JanusProStudent.from_paths(entries["checkpoint"], "tiny", SIZE)  # own copy: this test trains it
    with torch.no_grad():
        cond = student.encode_prompts(PROMPTS)
    trainable = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=1e-2)
    student.train()
    losses = []
    for _ in range(6):
        loss = student.loss(cond, codes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    model = student.model.model
    assert model.generation_head.vision_head.weight.grad is not None
    assert model.language_model.layers[0].self_attn.q_proj.weight.grad is not None
    assert not any(p.requires_grad for p in model.vqmodel.parameters())
    assert not model.vqmodel.training

    prefix = torch.zeros(3, 64, requires_grad=True)  # learnable prefix vectors (ARBooth)
    student.loss(insert_prefix(cond, prefix), codes).backward()
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0


def test_add_identifier_tokens(entries):
    student = JanusProStudent.from_paths(entries["checkpoint"], "tiny", SIZE)
    old = student.text_embedding.weight.detach().clone()
    ids = student.add_identifier_tokens(["<sks>", "<|User|>"], init_from="a dog")  # 2nd exists
    assert ids[0] == old.shape[0] and ids[1] < old.shape[0]
    table = student.text_embedding.weight
    assert table.shape[0] == old.shape[0] + 1 and student.model.config.text_config.vocab_size == table.shape[0]
    src = student.tokenizer("a dog", add_special_tokens=False)["input_ids"]
    assert torch.equal(table[ids[0]], old[src].mean(0))  # the initialisation's own op on the same rows: exact
    prompt = student.prompt_ids(["a <sks> dog"]).input_ids[0].tolist()
    assert ids[0] in prompt
    cond = student.encode_prompts(["a <sks> dog"])
    cond.features.sum().backward()
    assert table.grad[ids[0]].abs().sum() > 0


def test_parameter_groups_and_lora_targets(student, codes):
    from peft import LoraConfig, inject_adapter_in_model

    groups = student.parameter_groups()
    names = {n for n, _ in student.named_parameters()}
    assert {"text_embedding", "attn_qkv", "attn_out", "cross_attn", "mlp", "norms", "output", "layer.0",
            "layer.1"} <= set(groups)
    assert all(set(g) <= names for g in groups.values())
    lm = "model.model.language_model"
    assert groups["text_embedding"] == [f"{lm}.embed_tokens.weight"] and groups["cross_attn"] == []
    assert groups["attn_qkv"] == [f"{lm}.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qkv"]
    assert groups["attn_out"] == [f"{lm}.layers.{i}.self_attn.o_proj.weight" for i in range(2)]
    assert len(groups["mlp"]) == 6 and len(groups["norms"]) == 5 and len(groups["layer.1"]) == 9
    assert groups["output"] == [f"model.model.generation_head.{m}.{p}" for m in ("proj_out", "vision_head")
                                for p in ("weight", "bias")]
    assert not any("vqmodel" in n or "vision_model" in n or "lm_head" in n for g in groups.values() for n in g)
    assert student.module_names(["attn_qkv"], every_nth_layer=2) == [
        f"{lm}.layers.0.self_attn.{p}_proj" for p in "qkv"]

    targets = student.lora_target_modules()
    assert len(targets) == 7 * 2
    cond = student.encode_prompts(PROMPTS)
    wrapped = JanusProStudent.from_paths(student.model.name_or_path, "tiny", SIZE)
    with torch.no_grad():
        before = wrapped.logits(cond, codes)
    inject_adapter_in_model(LoraConfig(r=4, target_modules=targets), wrapped)
    lora = [n for n, _ in wrapped.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * 7 * 2 and not any("vision_model" in n for n in lora)
    with torch.no_grad():
        # LoRA B starts at 0: each wrapped layer adds exact zeros to the same base kernel's output
        assert torch.equal(wrapped.logits(cond, codes), before)
    assert f"{lm}.layers.0.self_attn.q_proj.base_layer.weight" in wrapped.parameter_groups()["attn_qkv"]

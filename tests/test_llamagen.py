"""LlamaGen student: official checkpoint layout, strict loading, conditioning, training loss and sampling."""
import argparse

import pytest
import torch
from safetensors.torch import save_file
from tolerances import chain_tol, elementwise_tol, network_terms, reduction_tol

from ar_models.base import PromptBatch
from ar_models.llamagen import (
    GPT,
    GPT_SIZES,
    VQ_SIZES,
    FeedForward,
    LlamaGenStudent,
    VectorQuantizer,
    VQModel,
    load_gpt_checkpoint,
    load_vq_checkpoint,
    precompute_rope_2d,
)
from ar_models.sampling import sample_logits
from testbed.tiny_students import build_tiny_llamagen

CORPUS = ["a photo of a dog", "a red cube on a table", "a cat sleeping in the snow", "a sks dog on the beach"]
PROMPTS = ["a photo of a dog", "a red cube on a table"]
SIZE = 32  # 4x4 code grid: keeps the 2-core sampling tests fast; the layout does not depend on it


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_tiny_llamagen(tmp_path_factory.mktemp("tiny"), CORPUS, seed=0, image_size=SIZE)


@pytest.fixture(scope="module")
def student(paths):
    return LlamaGenStudent.from_paths(**paths, image_size=SIZE)


@pytest.fixture
def codes(student):
    return torch.randint(0, student.gpt.config.vocab_size, (2, student.gpt.config.block_size),
                         generator=torch.Generator().manual_seed(0))


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_build_tiny_writes_official_layout(paths):
    gpt_sd = _state(paths["checkpoint"])
    per_layer = ["attention.wqkv.weight", "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
                 "feed_forward.w3.weight", "attention_norm.weight", "ffn_norm.weight"]
    assert set(gpt_sd) == {
        "tok_embeddings.weight", "cls_embedding.cap_proj.fc1.weight", "cls_embedding.cap_proj.fc2.weight",
        "cls_embedding.uncond_embedding", "norm.weight", "output.weight",
        *(f"layers.{i}.{name}" for i in range(2) for name in per_layer),
    }
    assert gpt_sd["layers.0.attention.wqkv.weight"].shape == (192, 64)
    assert gpt_sd["layers.0.feed_forward.w1.weight"].shape == (256, 64)  # int(2 * 4 * 64 / 3) rounded up to 256
    assert gpt_sd["cls_embedding.uncond_embedding"].shape == (16, 32)

    vq_sd = _state(paths["vq_checkpoint"])
    for key in ["encoder.conv_in.weight", "encoder.conv_blocks.0.res.1.conv2.weight",
                "encoder.conv_blocks.1.res.0.nin_shortcut.weight", "encoder.conv_blocks.2.downsample.conv.weight",
                "encoder.conv_blocks.3.attn.1.proj_out.weight", "encoder.mid.1.q.weight", "quant_conv.weight",
                "quantize.embedding.weight", "quantize.codebook_used", "post_quant_conv.weight",
                "decoder.conv_blocks.0.attn.2.k.weight", "decoder.conv_blocks.2.upsample.conv.weight",
                "decoder.conv_out.bias"]:
        assert key in vq_sd, key
    assert "encoder.conv_blocks.3.downsample.conv.weight" not in vq_sd  # no resampling at the last level
    assert "decoder.conv_blocks.3.upsample.conv.weight" not in vq_sd
    assert vq_sd["quantize.embedding.weight"].shape == (512, 8)
    assert (paths["text_encoder"] / "tokenizer.json").is_file()
    assert not [p for p in paths["checkpoint"].parent.iterdir() if p.name.startswith(".tmp")]


def test_build_tiny_is_deterministic_per_seed(paths, tmp_path):
    again = _state(build_tiny_llamagen(tmp_path / "a", CORPUS, seed=0)["checkpoint"])
    other = _state(build_tiny_llamagen(tmp_path / "b", CORPUS, seed=1)["checkpoint"])
    first = _state(paths["checkpoint"])
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["output.weight"], other["output.weight"])


@pytest.mark.parametrize("wrapper", ["model", "module", "state_dict", "bare", "training", "safetensors"])
def test_gpt_loader_round_trip_matches_in_memory(wrapper, tmp_path, codes):
    config = GPT_SIZES["tiny"]
    model = GPT(config).eval()
    sd = model.state_dict()
    path = tmp_path / ("gpt.safetensors" if wrapper == "safetensors" else "gpt.pt")
    if wrapper == "safetensors":
        save_file(sd, path)
    elif wrapper == "bare":
        torch.save(sd, path)
    elif wrapper == "training":  # what train_t2i.py writes
        opt = torch.optim.AdamW(model.parameters())
        torch.save({"model": sd, "optimizer": opt.state_dict(), "steps": 7, "args": argparse.Namespace(lr=1e-4)}, path)
    else:
        torch.save({wrapper: sd}, path)
    loaded = load_gpt_checkpoint(path, config)
    caption = torch.randn(2, config.cls_token_num, config.caption_dim)
    mask = torch.arange(config.cls_token_num)[None].expand(2, -1) >= torch.tensor([[3], [9]])
    with torch.no_grad():  # same weights, same kernels, same shapes: bit for bit
        assert torch.equal(loaded(codes[:, :-1], caption, mask), model(codes[:, :-1], caption, mask))


def test_vq_loader_round_trip_matches_in_memory(tmp_path, codes):
    model = VQModel(VQ_SIZES["tiny"]).eval()
    torch.save({"model": model.state_dict()}, tmp_path / "vq.pt")
    loaded = load_vq_checkpoint(tmp_path / "vq.pt", VQ_SIZES["tiny"])
    with torch.no_grad():  # same weights, same kernels, same shapes: bit for bit
        assert torch.equal(loaded.decode_code(codes), model.decode_code(codes))


@pytest.mark.parametrize("problem, key", [
    ("missing", "layers.1.ffn_norm.weight"),
    ("unexpected", "layers.0.attention.bogus.weight"),
    ("mis-shaped", "output.weight"),
])
def test_gpt_loader_rejects_bad_checkpoints(problem, key, paths, tmp_path):
    sd = _state(paths["checkpoint"])
    if problem == "missing":
        del sd[key]
    elif problem == "unexpected":
        sd[key] = torch.zeros(3)
    else:
        sd[key] = torch.zeros(511, 64)
    path = tmp_path / "bad.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match=problem) as err:
        load_gpt_checkpoint(path, GPT_SIZES["tiny"])
    assert key in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_loaders_tolerate_only_known_extras(paths, tmp_path):
    sd = _state(paths["checkpoint"])
    sd["freqs_cis"] = torch.zeros(80, 8, 2)
    sd["layers.0.attention.kv_cache.k_cache"] = torch.zeros(1)
    torch.save({"model": sd}, tmp_path / "extras.pt")
    load_gpt_checkpoint(tmp_path / "extras.pt", GPT_SIZES["tiny"])

    vq = _state(paths["vq_checkpoint"])
    del vq["quantize.embedding.weight"]
    torch.save({"model": vq}, tmp_path / "vq.pt")
    with pytest.raises(ValueError, match="quantize.embedding.weight"):
        load_vq_checkpoint(tmp_path / "vq.pt", VQ_SIZES["tiny"])
    torch.save([1, 2], tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        load_gpt_checkpoint(tmp_path / "junk.pt", GPT_SIZES["tiny"])


def test_unknown_size_names_error(paths):
    with pytest.raises(ValueError, match=r"'huge'.*tiny, world, B, L, XL, XXL, XXXL"):
        LlamaGenStudent.from_paths(**paths, size="huge", image_size=SIZE)
    with pytest.raises(ValueError, match=r"'VQ-32'.*VQ-16"):
        LlamaGenStudent.from_paths(**paths, vq_size="VQ-32", image_size=SIZE)


def test_released_size_shapes():
    ffn = FeedForward(GPT_SIZES["XL"])  # LlamaGen-XL: int(2 * 4 * 1280 / 3) = 3413 -> 3584
    assert ffn.w1.weight.shape == (3584, 1280)
    assert VQ_SIZES["VQ-16"].downsample == 16 and VQ_SIZES["VQ-8"].downsample == 8


def test_rope_is_2d_over_the_grid_and_zero_on_the_caption():
    T, grid, head_dim = 3, 4, 16
    rope = precompute_rope_2d(grid, head_dim, 10000.0, T)
    assert rope.shape == (T + grid * grid, head_dim // 2, 2)
    assert (rope[:T] == 0).all()  # LlamaGen's table: zero, not the identity rotation
    freqs = 1.0 / 10000.0 ** (torch.arange(0, head_dim // 2, 2).float() / (head_dim // 2))
    row, col = 2, 3
    angles = torch.cat([row * freqs, col * freqs])  # first half follows the row, second the column
    # same angles, but cos/sin of another tensor size may take the vectorised or the scalar path: each within
    # an ulp (<= 2u at |x| <= 1) of the exact value
    want = torch.stack([angles.cos(), angles.sin()], -1)
    torch.testing.assert_close(rope[T + row * grid + col], want, rtol=0, atol=elementwise_tol(torch.float32, 2))


def test_encode_prompts_left_pads_like_llamagen(student):
    long = " ".join(["dog"] * 40)
    cond = student.encode_prompts(["A photo of a DOG", long])
    T = student.gpt.config.cls_token_num
    assert cond.features.shape == (2, T, 32) and cond.mask.dtype == torch.bool
    assert cond.mask[0].tolist() == [False] * (T - 6) + [True] * 6  # 5 words + </s>, at the end
    assert cond.mask[1].all()  # truncated to cls_token_num
    assert (cond.features[0, : T - 6] == 0).all()
    ids = student.tokenizer(["a photo of a dog"], return_tensors="pt").input_ids
    assert ids[0, -1].item() == student.tokenizer.eos_token_id
    alone = student.text_encoder(input_ids=ids).last_hidden_state[0]
    # a batch of 2 prompts vs 1 and another length: other kernels through T5
    atol = chain_tol(torch.float32, network_terms(student.text_encoder), alone.abs().max().item())
    torch.testing.assert_close(cond.features[0, T - 6 :], alone, rtol=0, atol=atol)


def test_attention_is_causal_and_ignores_caption_padding(student, codes):
    cond = student.encode_prompts(PROMPTS)
    T = student.gpt.config.cls_token_num
    with torch.no_grad():
        base = student.gpt(codes[:, :-1], cond.features, cond.mask)
        later = codes.clone()
        later[:, 10:] = (later[:, 10:] + 1) % 512
        changed = student.gpt(later[:, :-1], cond.features, cond.mask)
        # same kernels, same shapes; masked positions weigh exactly 0 (exp(-inf)), so exactly equal
        assert torch.equal(changed[:, : T + 10], base[:, : T + 10])
        assert not torch.allclose(changed[:, T + 10 :], base[:, T + 10 :])
        noisy = cond.features + torch.randn_like(cond.features) * ~cond.mask[..., None]
        assert torch.equal(student.gpt(codes[:, :-1], noisy, cond.mask)[:, T:], base[:, T:])  # padding: masked
        other = student.gpt(codes[:, :-1], cond.features.flip(0), cond.mask.flip(0))
        assert not torch.allclose(other[:, T:], base[:, T:])  # the caption does matter


def test_image_round_trip_and_l2_codebook_lookup(student):
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    codes = student.encode_images(images)
    assert codes.shape == (2, 16) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 512
    out = student.decode_tokens(codes)
    assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1
    assert torch.equal(student.encode_images(images), codes)
    quantizer = VectorQuantizer(512, 8)
    with torch.no_grad():  # codes of very different norms: only an l2-normalised lookup recovers them
        quantizer.embedding.weight.mul_(torch.rand(512, 1) * 10 + 0.1)
    target = torch.randint(0, 512, (2, 16))
    z = quantizer.lookup(target, 4) * (torch.rand(2, 1, 4, 4) * 5 + 0.1)
    assert torch.equal(quantizer.quantize(z), target)
    # normalised in float32, then measured again: two 8-term sums of squares
    norms = quantizer.lookup(target, 4).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(2, 4, 4), rtol=reduction_tol(torch.float32, 2 * 8), atol=0)


def test_loss_is_finite_and_decreases(paths, codes):
    student = LlamaGenStudent.from_paths(**paths, image_size=SIZE)  # own copy: this test trains it
    cond = student.encode_prompts(PROMPTS)
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in student.gpt.parameters()}  # VQ and T5 frozen
    opt = torch.optim.Adam(trainable, lr=3e-3)
    student.train()
    losses = []
    for _ in range(8):
        loss = student.loss(cond, codes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses
    assert not student.text_encoder.training and not student.vq.training


def test_cond_dropout_uses_unconditional_embedding(student, codes):
    cond = student.encode_prompts(PROMPTS)
    uncond = PromptBatch(student.gpt.cls_embedding.uncond_embedding.expand(2, -1, -1), cond.mask)
    with torch.no_grad():
        dropped, reference, kept = (student.loss(cond, codes, cond_dropout=1.0), student.loss(uncond, codes),
                                    student.loss(cond, codes, cond_dropout=0.0))
    assert torch.equal(dropped, reference)  # same kernels, same shapes
    assert not torch.equal(dropped, kept)


def test_generate_is_deterministic_and_cache_is_exact(student):
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


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_batched_cfg_matches_separate_forwards(student, scale):
    """Reference sampler: cond and uncond rows in separate uncached forwards, guided by hand."""
    cond = student.encode_prompts(PROMPTS)
    gpt, N = student.gpt, student.gpt.config.block_size
    uncond = gpt.cls_embedding.uncond_embedding.expand(2, -1, -1)
    generator = torch.Generator().manual_seed(11)
    tokens = torch.empty(2, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(N):
            c = gpt(tokens, cond.features, cond.mask)[:, -1]
            u = gpt(tokens, uncond, cond.mask)[:, -1]
            step = sample_logits(u + scale * (c - u), temperature=1.0, top_k=50, top_p=1.0, generator=generator)
            tokens = torch.cat([tokens, step[:, None]], dim=1)
    assert torch.equal(student.sample_tokens(cond, cfg_scale=scale, top_k=50, seed=11), tokens)


def test_sample_logits_filters():
    logits = torch.randn(4, 512, generator=torch.Generator().manual_seed(0)).repeat(50, 1)
    g = torch.Generator().manual_seed(0)
    best = logits.argmax(-1)
    assert torch.equal(sample_logits(logits, top_k=1, generator=g), best)
    assert torch.equal(sample_logits(logits, top_p=1e-6, generator=g), best)
    assert torch.equal(sample_logits(logits, temperature=0.0, generator=g), best)
    top3 = logits.topk(3).indices
    drawn = sample_logits(logits, top_k=3, generator=g)
    assert (drawn[:, None] == top3).any(-1).all()
    assert len(set(drawn[::4].tolist())) > 1  # still random within the top 3


def test_autocast_sampling_runs(student):
    cond = student.encode_prompts(PROMPTS[:1])
    student.gpt.requires_grad_(False)
    tokens = student.sample_tokens(cond, cfg_scale=2.0, seed=0, autocast=True)
    assert tokens.shape == (1, 16) and 0 <= tokens.min() and tokens.max() < 512
    assert not any(p.requires_grad for p in student.gpt.parameters())  # the bf16 weight cache restores the flags
    assert torch.equal(tokens, student.sample_tokens(cond, cfg_scale=2.0, seed=0, autocast=True, use_cache=False))


def test_parameter_groups_and_lora_targets(student, codes):
    from peft import LoraConfig, inject_adapter_in_model

    groups = student.parameter_groups()
    names = {n for n, _ in student.named_parameters()}
    assert {"caption_embedder", "tok_embeddings", "attn_qkv", "attn_out", "mlp", "layer.0", "layer.1"} <= set(groups)
    assert all(set(g) <= names for g in groups.values())
    assert groups["attn_qkv"] == ["gpt.layers.0.attention.wqkv.weight", "gpt.layers.1.attention.wqkv.weight"]
    assert len(groups["mlp"]) == 6 and len(groups["layer.1"]) == 7
    assert set().union(*groups.values()) == {f"gpt.{n}" for n, _ in student.gpt.named_parameters()} | {
        "text_encoder.shared.weight"}
    assert groups["text_embedding"] == ["text_encoder.shared.weight"] and groups["cross_attn"] == []
    assert student.module_names(["attn_qkv"], every_nth_layer=2) == ["gpt.layers.0.attention.wqkv"]

    gpt = GPT(student.gpt.config)
    gpt.load_state_dict(student.gpt.state_dict())
    cond = student.encode_prompts(PROMPTS)
    with torch.no_grad():
        before = gpt(codes[:, :-1], cond.features, cond.mask)
    gpt = inject_adapter_in_model(LoraConfig(r=4, target_modules=student.lora_target_modules()), gpt)
    lora = [n for n, _ in gpt.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * 5 * gpt.config.n_layer
    with torch.no_grad():
        # LoRA B starts at 0: each wrapped layer adds exact zeros to the same base kernel's output
        assert torch.equal(gpt(codes[:, :-1], cond.features, cond.mask), before)

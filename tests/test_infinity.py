"""Infinity student: release checkpoint layout, strict loading, BSQ multi-scale tokens, bitwise loss, sampling
and the tuning recipes on the tiny replica."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line
from tolerances import chain_tol, network_terms, reduction_tol

from ar_models.infinity import (
    BSQVAE,
    INFINITY_SIZES,
    SCALES,
    VAE_SIZES,
    Infinity,
    InfinityStudent,
    load_infinity_checkpoint,
    load_vae_checkpoint,
    sample_bits,
    scale_schedule,
)
from proxytune.tuning import TuneConfig, TuningData, build_recipe
from testbed.tiny_students import build_tiny_infinity

CORPUS = ["a photo of a dog", "a red cube on a table", "a cat sleeping in the snow", "a sks toy on the beach"]
PROMPTS = ["a photo of a dog", "a red cube on a table"]
SCHEDULE = (1, 2, 4)  # 64 px at stride 16: 1 + 4 + 16 = 21 positions


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_tiny_infinity(tmp_path_factory.mktemp("tiny"), CORPUS, seed=0, image_size=64)


@pytest.fixture(scope="module")
def student(paths):
    return InfinityStudent.from_paths(**paths, image_size=64)


@pytest.fixture(scope="module")
def bits(student):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return student.encode_images(images)


def _model(seed: int) -> Infinity:
    torch.manual_seed(seed)
    return Infinity(INFINITY_SIZES["tiny"], SCHEDULE).eval()


def test_build_tiny_writes_release_layout(paths):
    sd = torch.load(paths["checkpoint"], map_location="cpu", weights_only=True)
    for key, shape in {
        "cfg_uncond": (32, 32), "text_norm.weight": (32,), "text_proj_for_sos.ca.mat_q": (1, 2, 32),
        "text_proj_for_sos.ca.mat_kv.weight": (128, 32), "text_proj_for_ca.2.weight": (64, 64),
        "pos_start": (1, 1, 64), "lvl_embed.weight": (15, 64), "word_embed.weight": (64, 8),
        "shared_ada_lin.1.weight": (384, 64), "head_nm.ada_lin.1.weight": (128, 64), "head.weight": (16, 64),
        "block_chunks.1.module.1.sa.mat_qkv.weight": (192, 64), "block_chunks.0.module.0.sa.scale_mul_1H11": (1, 4, 1, 1),
        "block_chunks.0.module.0.sa.zero_k_bias": (64,), "block_chunks.0.module.1.ca.mat_kv.weight": (128, 64),
        "block_chunks.1.module.0.ca_norm.bias": (64,), "block_chunks.1.module.0.ada_gss": (1, 1, 6, 64),
        "block_chunks.1.module.0.ffn.fc1.weight": (256, 64),
    }.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith(("blocks.", "rope", "scale_ids")) for k in sd)

    vae = torch.load(paths["vq_checkpoint"], map_location="cpu", weights_only=True)["vae"]
    for key in ["encoder.conv_in.conv.weight", "encoder.down.0.block.0.norm1.norm.weight",
                "encoder.down.3.downsample.conv.conv.weight", "encoder.down.3.block.0.nin_shortcut.conv.weight",
                "encoder.mid.block_2.conv2.conv.weight", "encoder.conv_out.conv.weight", "decoder.conv_in.conv.weight",
                "decoder.up.0.block.1.conv1.conv.weight", "decoder.up.4.upsample.conv.conv.weight",
                "decoder.norm_out.norm.bias", "quantizer.lfq.mask", "quantize.lfq.mask"]:
        assert key in vae, key
    assert "encoder.down.4.downsample.conv.conv.weight" not in vae  # stride 16: four of five levels resample
    assert "decoder.up.0.upsample.conv.conv.weight" not in vae
    assert vae["encoder.conv_out.conv.weight"].shape[0] == 8  # 8-bit codes
    assert (paths["text_encoder"] / "tokenizer.json").is_file()


def test_real_sizes_match_the_release():
    assert scale_schedule(64) == SCALES and len(SCALES) == 13  # 1024 px: 13 scales up to 64x64
    assert scale_schedule(16) == (1, 2, 4, 6, 8, 12, 16)  # 256 px, the 0.06M preset
    with torch.device("meta"):
        model = Infinity(INFINITY_SIZES["2b"], SCALES)
    n = sum(p.numel() for p in model.parameters())
    assert 2.0e9 < n < 2.4e9, n
    assert model.state_dict()["block_chunks.7.module.3.sa.mat_qkv.weight"].shape == (6144, 2048)
    assert model.state_dict()["head.weight"].shape == (64, 2048)  # 32 bits x 2 logits
    assert model.state_dict()["text_proj_for_sos.ca.mat_q"].shape == (1, 16, 128)
    with torch.device("meta"):
        vae = BSQVAE(VAE_SIZES["d32"])
    assert vae.state_dict()["encoder.down.2.block.0.conv1.conv.weight"].shape == (512, 256, 3, 3)


def test_checkpoint_round_trip_gives_equal_logits(student, tmp_path, bits):
    model = _model(3)
    path = tmp_path / "m.pth"
    torch.save(model.state_dict(), path)
    cond = student.encode_prompts(PROMPTS)
    with torch.no_grad():  # same weights, same kernels, same shapes: bit for bit
        student.infinity, original = model, student.infinity
        try:
            want = student.logits(cond, bits)
            student.infinity = load_infinity_checkpoint(path, INFINITY_SIZES["tiny"], SCHEDULE)
            assert torch.equal(student.logits(cond, bits), want)
            torch.save({"trainer": {"gpt_fsdp": model.state_dict()}}, tmp_path / "full.pth")  # a training checkpoint
            student.infinity = load_infinity_checkpoint(tmp_path / "full.pth", INFINITY_SIZES["tiny"], SCHEDULE)
            assert torch.equal(student.logits(cond, bits), want)
        finally:
            student.infinity = original


def test_vae_loads_release_key_variants(paths, tmp_path):
    state = torch.load(paths["vq_checkpoint"], map_location="cpu", weights_only=True)["vae"]
    vae = load_vae_checkpoint(paths["vq_checkpoint"], VAE_SIZES["tiny"])
    # the release's loader also takes conv/norm weights without their wrapper level, and no bit-mask buffer
    short = {k.replace(".conv.weight", ".weight").replace(".norm.weight", ".weight"): v for k, v in state.items()
             if not k.endswith("lfq.mask")}
    torch.save({"vae": short}, tmp_path / "short.pth")
    other = load_vae_checkpoint(tmp_path / "short.pth", VAE_SIZES["tiny"])
    z = torch.randn(1, 8, 4, 4)
    assert torch.equal(vae.decoder(z), other.decoder(z))  # same weights, same kernels, same shapes: bit for bit


@pytest.mark.parametrize("edit, words", [
    (lambda sd: sd.pop("block_chunks.1.module.0.ca.mat_kv.weight"), ["missing", "ca.mat_kv.weight"]),
    (lambda sd: sd.__setitem__("head.weight", torch.zeros(64, 64)), ["mis-shaped", "head.weight"]),
    (lambda sd: sd.__setitem__("blocks.0.extra", torch.zeros(1)), ["unexpected", "blocks.0.extra"]),
])
def test_infinity_loader_names_bad_tensors(paths, tmp_path, edit, words):
    sd = torch.load(paths["checkpoint"], map_location="cpu", weights_only=True)
    edit(sd)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        load_infinity_checkpoint(tmp_path / "bad.pth", INFINITY_SIZES["tiny"], SCHEDULE)
    assert_one_line(err, "bad.pth", *words)


def test_vae_loader_names_bad_tensors(paths, tmp_path):
    state = torch.load(paths["vq_checkpoint"], map_location="cpu", weights_only=True)
    del state["vae"]["decoder.conv_out.conv.bias"]
    torch.save(state, tmp_path / "bad_vae.pth")
    with pytest.raises(ValueError) as err:
        load_vae_checkpoint(tmp_path / "bad_vae.pth", VAE_SIZES["tiny"])
    assert_one_line(err, "bad_vae.pth", "missing", "decoder.conv_out.conv.bias")
    torch.save(state["vae"], tmp_path / "unwrapped.pth")
    with pytest.raises(ValueError) as err:
        load_vae_checkpoint(tmp_path / "unwrapped.pth", VAE_SIZES["tiny"])
    assert_one_line(err, "unwrapped.pth", "'vae'")


def test_image_to_multiscale_bits_to_image(student):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    tokens = student.encode_images(images)
    assert tokens.shape == (2, 21, 8) and tokens.dtype == torch.long and set(tokens.unique().tolist()) <= {0, 1}
    vae = student.vae
    with torch.no_grad():
        h = vae.encoder(images)
        bits, z = vae.quantize(h, SCHEDULE)
        assert torch.equal(bits, tokens)
        assert torch.equal(bits[:, 0], (h.mean((2, 3)) > 0).long())  # scale 1x1: the sign of the mean latent
        # each code is (2 * bit - 1) / sqrt(d); the residual pyramid sums back to the quantised latent. latent()
        # builds the maps from the tokens in another memory layout than quantize(), so the bilinear resizes and
        # the decoder's convs may take other kernels: per element, one bilinearly upsampled code (<= 4 terms)
        # per scale, summed
        latent = vae.latent(bits, SCHEDULE)
        n_scales, d = len(SCHEDULE), bits.shape[-1]
        atol = reduction_tol(torch.float32, 5 * n_scales, n_scales / d**0.5)
        torch.testing.assert_close(latent, z, rtol=0, atol=atol)
        decoded = student.decode_tokens(tokens)
        want = vae.decoder(z)
        atol = chain_tol(torch.float32, network_terms(vae.decoder), want.abs().max().item())
        torch.testing.assert_close(decoded, want.clamp(-1, 1), rtol=0, atol=atol)
    assert decoded.shape == (2, 3, 64, 64) and decoded.abs().max() <= 1


def test_logits_are_bitwise_and_block_causal(student, bits):
    cond = student.encode_prompts(PROMPTS)
    with torch.no_grad():
        logits = student.logits(cond, bits)
        assert logits.shape == (2, 21, 8, 2)
        flipped = bits.clone()
        flipped[:, 1:5] ^= 1  # scale 1 (2x2) changes only what scale 2 reads
        other = student.logits(cond, flipped)
        # same kernels, same shapes, and masked positions weigh exactly 0: bit for bit where causal
        assert torch.equal(other[:, :5], logits[:, :5]) and not torch.equal(other[:, 5:], logits[:, 5:])
        flipped[:, 5:] ^= 1  # the last scale's own bits feed nothing
        assert torch.equal(student.logits(cond, flipped), other)
        swapped = student.logits(student.encode_prompts(PROMPTS[::-1]), bits)
        assert not torch.allclose(swapped, logits)  # text conditions every scale


def test_weighted_loss_averages_per_token_and_backprops(student, bits):
    cond = student.encode_prompts(PROMPTS)
    weights = student.scale_token_weights(early_scales=2, early=1.0, late=0.5)
    assert weights.tolist() == [1.0] * 5 + [0.5] * 16
    logits = student.logits(cond, bits)
    ce = F.cross_entropy(logits.reshape(-1, 2), bits.reshape(-1), reduction="none").view(2, 21, 8).mean(-1)
    by_hand = (ce * weights).sum() / (weights.sum() * 2)
    # same logits and per-bit CE (same kernels and shapes); the (weighted) mean over its 2 x 21 x 8 positive
    # terms is summed in another order
    atol = reduction_tol(torch.float32, bits.numel(), by_hand.item())
    torch.testing.assert_close(student.loss(cond, bits, token_weights=weights), by_hand, rtol=0, atol=atol)
    torch.testing.assert_close(student.loss(cond, bits), ce.mean(), rtol=0,
                               atol=reduction_tol(torch.float32, bits.numel(), ce.mean().item()))
    student.zero_grad()
    student.loss(cond, bits, cond_dropout=0.5, token_weights=weights).backward()
    qkv = student.infinity.block_chunks[0].module[0].sa.mat_qkv.weight
    assert qkv.grad is not None and qkv.grad.abs().sum() > 0
    assert all(p.grad is None for p in student.vae.parameters())
    student.zero_grad()


def test_sample_bits_filters_like_infinity():
    logits = torch.tensor([[[5.0, -5.0], [0.0, 0.2]]])  # p(0) = 0.99995, and a near coin flip
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_bits(logits, top_k=900, top_p=0.97, generator=g) for _ in range(200)])
    assert (draws[:, 0, 0] == 0).all()  # the unlikely value (mass <= 0.03) is removed
    assert 0 < draws[:, 0, 1].float().mean() < 1  # both kept when neither is that unlikely


def test_generate_returns_images_deterministically(student):
    a = student.generate(PROMPTS, seed=3)
    assert a.shape == (2, 3, 64, 64) and a.abs().max() <= 1
    assert torch.equal(student.generate(PROMPTS, seed=3), a)
    cond = student.encode_prompts(PROMPTS)
    one = student.sample_tokens(cond, seed=3)
    assert not torch.equal(student.sample_tokens(cond, seed=4), one)
    per_scale = student.sample_tokens(cond, cfg_scale=[1.0, 3.0, 4.0], temperature=[1.0, 0.7, 0.5], seed=3)
    assert per_scale.shape == one.shape
    with pytest.raises(ValueError, match="cfg_scale: 2 values for 3 scales"):
        student.sample_tokens(cond, cfg_scale=[1.0, 2.0])


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_cached_and_uncached_sampling_agree(student, cfg):
    cond = student.encode_prompts(PROMPTS)
    cached = student.sample_tokens(cond, cfg_scale=cfg, temperature=1.0, top_k=0, top_p=1.0, seed=7)
    uncached = student.sample_tokens(cond, cfg_scale=cfg, temperature=1.0, top_k=0, top_p=1.0, seed=7,
                                     use_cache=False)
    assert torch.equal(cached, uncached)


def test_parameter_groups(student):
    groups = student.parameter_groups()
    for key in ("text_embedding", "attn_qkv", "attn_out", "cross_attn", "mlp", "norms", "output"):
        assert groups[key], key
    assert [k for k in groups if k.startswith("layer.")] == [f"layer.{i}" for i in range(4)]
    assert all(".block_chunks.1.module.1." in n for n in groups["layer.3"])
    assert groups["text_embedding"] == ["text_encoder.shared.weight"]
    assert not any("text_proj_for_sos" in n for n in groups["cross_attn"])
    modules = dict(student.named_modules())
    for group in ("attn_qkv", "attn_out", "cross_attn", "mlp"):
        assert all(isinstance(modules[m], torch.nn.Linear) for m in student.module_names([group]))


def _data(student, with_prior: bool) -> TuningData:
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    prompts = ["a sks toy on the beach", "a sks toy in the snow", "a red sks toy", "a sks toy on a table"]
    data = TuningData(codes=student.encode_images(images), prompts=prompts, identifier="sks", class_noun="toy",
                      token_weights=student.scale_token_weights())
    if with_prior:
        data.prior_prompt = "a photo of toy"
        data.prior_codes = student.encode_images(student.generate([data.prior_prompt] * 2, cfg_scale=1.0, seed=5))
    return data


@pytest.mark.parametrize("cfg", [
    TuneConfig(method="proxy_tuning", steps=2, batch_size=2, learning_rate=1e-2),
    TuneConfig(method="two_stage", steps=1, embedding_steps=1, batch_size=2, learning_rate=1e-2),
    TuneConfig(method="arbooth", steps=2, batch_size=2, learning_rate=1e-2, betas=(0.9, 0.97)),
], ids=lambda c: c.method)
def test_tuning_recipes_run(paths, cfg):
    student = InfinityStudent.from_paths(**paths, image_size=64)
    recipe = build_recipe(student, copy.deepcopy(cfg))
    recipe.setup(_data(student, with_prior=cfg.method == "arbooth"))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    if cfg.method == "arbooth":
        # the teacher is a frozen copy run with the same kernels on the same shapes: KL exactly 0
        assert recipe.distillation(torch.arange(2)).item() == 0.0
    for _ in range(2):
        losses = recipe.train_step()
        assert torch.isfinite(torch.tensor(losses["loss"]))
    moved = {n for n, p in student.named_parameters() if not torch.equal(p.detach(), before[n])}
    if cfg.method == "proxy_tuning":
        assert moved and all("lora_" in n for n in moved)
    if cfg.method == "two_stage":
        assert "text_encoder.shared.weight" in moved and any("lora_" in n for n in moved)
    if cfg.method == "arbooth":
        groups = student.parameter_groups()
        assert moved == set(groups["mlp"]) | set(groups["cross_attn"])
        assert losses["prior_kl"] > 0 and recipe.trainable.prefix.abs().sum() > 0
    student.eval()
    assert student.generate_from(student.encode_prompts(["a sks toy"]), seed=0).shape == (1, 3, 64, 64)


def test_bad_sizes_fail_in_one_line(paths):
    with pytest.raises(ValueError) as err:
        InfinityStudent.from_paths(**paths, image_size=40)
    assert_one_line(err, "image_size 40", "16")
    with pytest.raises(ValueError) as err:
        InfinityStudent.from_paths(**paths, image_size=48)  # a 3x3 grid is not on Infinity's schedule
    assert_one_line(err, "3x3")
    with pytest.raises(ValueError) as err:
        InfinityStudent.from_paths(**paths, size="8b")
    assert_one_line(err, "'8b'", "tiny", "2b")

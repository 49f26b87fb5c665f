"""DreamBench metrics on tiny random-init evaluators written in the real on-disk formats."""
from __future__ import annotations

import hashlib
import itertools
import re
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from tolerances import chain_tol, network_terms, reduction_tol

from proxytune import metrics
from proxytune.metrics import ClipEmbedder, DinoEmbedder, EmbeddingCache, dreambench_scores, strip_identifier
from testbed.tiny_evaluators import TINY_CLIP_NAME, build_tiny_evaluators


def _noise(seed: int, size=(80, 96)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return build_tiny_evaluators(tmp_path_factory.mktemp("tiny") / "evaluators", seed=0)


@pytest.fixture(scope="module")
def dino(tiny) -> DinoEmbedder:
    return DinoEmbedder(tiny["dino"])


@pytest.fixture(scope="module")
def clip(tiny) -> ClipEmbedder:
    return ClipEmbedder(tiny["clip_model_name"], tiny["clip_pretrained"], config_dir=tiny["clip_config_dir"])


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def embedding_tol(embedder) -> float:
    """Per element of an L2-normalised embedding (|x| <= 1) computed along two kernel paths (other batch
    shapes): one pass through the model."""
    model = embedder.model
    return chain_tol(torch.float32, network_terms(model))


def score_tol(dino, clip) -> float:
    """A score (a mean of cosines, <= 1) computed along two kernel paths: a chain through two embeddings (the
    larger model, twice) and their dot product."""
    terms = 2 * max(network_terms(dino.model), network_terms(clip.model)) + 48  # 48: the widest embedding
    return chain_tol(torch.float32, terms)


def test_build_writes_real_formats_deterministically(tiny, tmp_path):
    dino_dir, clip_dir = Path(tiny["dino"]), Path(tiny["clip_config_dir"])
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in dino_dir.iterdir()}
    assert (clip_dir / f"{TINY_CLIP_NAME}.json").is_file() and Path(tiny["clip_pretrained"]).is_file()

    again = build_tiny_evaluators(tmp_path / "again", seed=0)
    other = build_tiny_evaluators(tmp_path / "other", seed=1)
    for key, rel in (("dino", "model.safetensors"), ("clip_pretrained", "")):
        same = _sha(Path(tiny[key]) / rel) == _sha(Path(again[key]) / rel)
        differs = _sha(Path(tiny[key]) / rel) != _sha(Path(other[key]) / rel)
        assert same and differs, key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]  # no temp leftovers
    with pytest.raises(FileExistsError, match="again"):
        build_tiny_evaluators(tmp_path / "again")


def test_loaders_read_back_saved_weights(tiny, dino, clip):
    saved = load_file(Path(tiny["dino"]) / "model.safetensors")
    loaded = dino.model.state_dict()
    for key in ("embeddings.cls_token", "embeddings.position_embeddings",
                "embeddings.patch_embeddings.projection.weight"):
        assert torch.equal(saved[key], loaded[key]), key
    saved = load_file(tiny["clip_pretrained"])
    for key, value in clip.model.state_dict().items():
        assert torch.equal(saved[key], value), key

    images = [_noise(0), Image.new("RGBA", (50, 70), (10, 200, 30, 128))]
    # normalised in float32, then measured again: two d-term sums of squares
    for embedder, dim in ((dino, 48), (clip, 32)):
        emb = embedder.embed_images(images, batch_size=1)
        assert emb.shape == (2, dim) and emb.dtype == torch.float32
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2), rtol=reduction_tol(torch.float32, 2 * dim), atol=0)
    text = clip.embed_texts(["a dog", "a red cube"])
    assert text.shape == (2, 32)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2), rtol=reduction_tol(torch.float32, 2 * 32), atol=0)


def test_identical_sets_score_one_and_different_below(dino, clip):
    a, b = _noise(1), Image.new("RGB", (64, 64), (200, 30, 30))
    same = dreambench_scores([a, a], ["a dog", "a cat"], [a], dino, clip)
    # a's embeddings in a batch of 2 and of 1 differ by rounding (e), but for unit vectors 1 - cos = |e|**2 / 2:
    # second order. First order is only the float32 normalisation (a d-term sum of squares, both vectors).
    for key, embedder, dim in (("dino", dino, 48), ("clip_i", clip, 32)):
        tol = reduction_tol(torch.float32, 2 * dim) + dim * embedding_tol(embedder) ** 2
        assert same[key] == pytest.approx(1.0, rel=0, abs=tol), key
    diff = dreambench_scores([a], ["a dog"], [b], dino, clip)
    assert diff["dino"] < 0.99 and diff["clip_i"] < 0.99
    with pytest.raises(ValueError):
        dreambench_scores([a, b], ["only one prompt"], [a], dino, clip)


def test_scores_match_direct_computation(tiny, dino, clip):
    """CLIP-T, CLIP-I and DINO recomputed here straight from open_clip / transformers."""
    from transformers import ViTImageProcessorPil, ViTModel

    generated = [_noise(2), _noise(3, size=(64, 64)), Image.linear_gradient("L").convert("RGB")]
    prompts = ["a dog on the beach", "a dog in the snow", "a red cube"]
    references = [_noise(4), Image.new("RGB", (70, 70), (20, 90, 200))]
    scores = dreambench_scores(generated, prompts, references, dino, clip)

    open_clip.add_model_config(Path(tiny["clip_config_dir"]) / f"{TINY_CLIP_NAME}.json")
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP_NAME, pretrained=tiny["clip_pretrained"])
    tokenizer = open_clip.get_tokenizer(TINY_CLIP_NAME)
    vit = ViTModel.from_pretrained(tiny["dino"], add_pooling_layer=False)
    processor = ViTImageProcessorPil.from_pretrained(tiny["dino"])
    model.eval(), vit.eval()
    with torch.no_grad():
        gen_c = F.normalize(model.encode_image(torch.stack([preprocess(im) for im in generated])), dim=-1)
        ref_c = F.normalize(model.encode_image(torch.stack([preprocess(im) for im in references])), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
        cls = lambda ims: F.normalize(  # noqa: E731
            vit(**processor(images=ims, return_tensors="pt")).last_hidden_state[:, 0], dim=-1)
        gen_d, ref_d = cls(generated), cls(references)

    clip_t = (gen_c * txt).sum(-1).mean().item()
    assert abs(clip_t) > 1e-3  # not trivially zero, so the comparison means something
    tol = score_tol(dino, clip)  # the same models, batched differently
    assert scores["clip_t"] == pytest.approx(clip_t, rel=0, abs=tol)
    assert metrics.clip_t(generated, prompts, clip) == pytest.approx(clip_t, rel=0, abs=tol)  # no references
    assert scores["clip_i"] == pytest.approx((gen_c @ ref_c.T).mean().item(), rel=0, abs=tol)
    assert scores["dino"] == pytest.approx((gen_d @ ref_d.T).mean().item(), rel=0, abs=tol)


def test_embedding_cache_skips_model(tiny, dino, clip, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    cached_dino = DinoEmbedder(tiny["dino"], cache=cache)
    cached_clip = ClipEmbedder(tiny["clip_model_name"], tiny["clip_pretrained"],
                               config_dir=tiny["clip_config_dir"], cache=cache)
    a, b = _noise(5), _noise(6)
    changed = b.copy()
    changed.putpixel((0, 0), tuple(255 - v for v in b.getpixel((0, 0))))
    for embedder, tower, uncached in ((cached_dino, cached_dino.model, dino),
                                      (cached_clip, cached_clip.model.visual, clip)):
        seen: list[int] = []  # batch size of every forward pass of the image tower
        tower.register_forward_hook(
            lambda m, args, kwargs, out: seen.append((args or [kwargs.get("pixel_values")])[0].shape[0]),
            with_kwargs=True)

        first = embedder.embed_images([a, b, a])
        assert seen == [2]  # the repeated image is embedded once
        # a batch of 2 here, of 3 uncached: other kernels
        torch.testing.assert_close(first, uncached.embed_images([a, b, a]), rtol=0, atol=embedding_tol(uncached))
        second = embedder.embed_images([b, a])
        assert seen == [2]  # everything cached: no forward pass
        assert torch.equal(second, first[[1, 0]])  # cache hits: the stored values themselves
        embedder.embed_images([a, changed])
        assert seen == [2, 1]  # one changed pixel -> only that image is re-embedded

    # Entries are keyed by model identity: another model must not read them.
    other = DinoEmbedder(build_tiny_evaluators(tmp_path / "other", seed=1)["dino"], cache=cache)
    assert other.model_id != cached_dino.model_id
    assert not torch.allclose(other.embed_images([a]), cached_dino.embed_images([a]))


def test_missing_paths_name_the_path(tiny, tmp_path):
    missing = tmp_path / "no_such_dino"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        DinoEmbedder(missing)
    weights = tmp_path / "no_such_weights.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(weights))):
        ClipEmbedder(tiny["clip_model_name"], weights, config_dir=tiny["clip_config_dir"])
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "no_cfg"))):
        ClipEmbedder(tiny["clip_model_name"], tiny["clip_pretrained"], config_dir=tmp_path / "no_cfg")


def test_strip_identifier():
    assert strip_identifier("a photo of sks dog", "sks") == "a photo of dog"
    assert strip_identifier("sks  dog,  sks", "sks") == "dog,"
    assert strip_identifier("a tasks list", "sks") == "a tasks list"  # only whole tokens


def test_prompt_scores_ignore_order_and_match_scoring_all_at_once(dino, clip):
    from proxytune.metrics import prompt_scores, summarize

    generated = [_noise(10 + i) for i in range(6)]
    prompts = ["a dog on the beach", "a dog in the snow", "a red dog"] * 2
    references = [_noise(20), _noise(21, size=(64, 64))]
    rows = prompt_scores(generated, prompts, references, dino, clip, batch_size=4)
    assert [r["prompt"] for r in rows] == prompts[:3] and all(r["images"] == 2 for r in rows)

    order = [5, 2, 0, 4, 1, 3]
    shuffled = prompt_scores([generated[i] for i in order], [prompts[i] for i in order],
                             references[::-1], dino, clip, batch_size=1)
    by_prompt = {r["prompt"]: r for r in shuffled}
    # Batches of 4, of 1 and of 32 (dreambench_scores' default) run the models with other kernels: the scores
    # agree to rounding along the models, not bit for bit.
    tol = score_tol(dino, clip)
    for first, second in itertools.combinations(rows, 2):  # so a row mix-up could not pass
        assert all(abs(first[key] - second[key]) > 10 * tol for key in ("dino", "clip_i", "clip_t"))
    for row in rows:
        for key in ("dino", "clip_i", "clip_t"):
            assert by_prompt[row["prompt"]][key] == pytest.approx(row[key], rel=0, abs=tol), key
    whole = dreambench_scores(generated, prompts, references, dino, clip)
    for key, value in summarize(rows).items():
        assert whole[key] == pytest.approx(value, rel=0, abs=tol), key

    # CLIP-T of one prompt group, written differently: per-image dot products averaged by hand.
    img = clip.embed_images([generated[0], generated[3]])
    txt = clip.embed_texts(["a dog on the beach"])[0]
    assert rows[0]["clip_t"] == pytest.approx(sum(float(e @ txt) for e in img) / 2, rel=0, abs=tol)


def test_cache_counts_hits_and_misses_across_batches(tiny, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    embedder = DinoEmbedder(tiny["dino"], cache=cache)
    images = [_noise(30 + i) for i in range(7)]
    first = embedder.embed_images(images, batch_size=3)
    assert (cache.hits, cache.misses) == (0, 7)
    again = DinoEmbedder(tiny["dino"], cache=EmbeddingCache(tmp_path / "cache"))  # a new process, same disk
    # all seven are cache hits (checked next): the stored values themselves, so exactly equal
    assert torch.equal(again.embed_images(images[::-1], batch_size=2), first.flip(0))
    assert (again.cache.hits, again.cache.misses) == (7, 0)


@pytest.fixture(scope="module")
def alexnet_features(tmp_path_factory) -> Path:
    """A random-init torchvision AlexNet checkpoint in the real format (features only: the classifier is big)."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lpips") / "alexnet.pth"
    torch.save({k: v for k, v in torchvision.models.alexnet().state_dict().items() if k.startswith("features.")},
               path)
    return path


def test_lpips_loads_a_local_backbone_and_scores_diversity(alexnet_features, tmp_path):
    pytest.importorskip("lpips")
    import lpips as lpips_pkg
    import torchvision

    from proxytune.images import to_tensor
    from proxytune.metrics import LpipsDistance

    ours = LpipsDistance(alexnet_features)
    a, b, c = _noise(40, (64, 64)), _noise(41, (64, 64)), Image.new("RGB", (64, 64), (9, 120, 40))
    # both sides of every pair are the same image at the same batch position, run through the same kernels:
    # bit-identical features, so exactly 0
    assert ours.mean_pairwise([a, a, a]) == 0.0
    assert ours.mean_pairwise([a]) != ours.mean_pairwise([a])  # NaN: one image has no diversity

    # Independent: the package's own model with torchvision's AlexNet features loaded module by module.
    ref = lpips_pkg.LPIPS(net="alex", pnet_rand=True, verbose=False)
    features = torchvision.models.alexnet().features
    features.load_state_dict({k[len("features."):]: v for k, v in torch.load(alexnet_features).items()})
    for sl in (ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5):
        for name, module in sl.named_children():
            module.load_state_dict(features[int(name)].state_dict())
    x = to_tensor([a, b, c])
    with torch.no_grad():
        expected = (ref(x[0:1], x[1:2]) + ref(x[0:1], x[2:3]) + ref(x[1:2], x[2:3])).item() / 3
    # one batch of 3 pairs vs 3 batches of 1: a chain through the backbone and LPIPS' heads, then the means over
    # positions (fewer than the 64 x 64 pixels); LPIPS sums positive terms, so its size bounds theirs
    tol = chain_tol(torch.float32, network_terms(ref) + 64 * 64, expected)
    assert ours.mean_pairwise([a, b, c]) == pytest.approx(expected, rel=0, abs=tol)
    assert expected > 0

    broken = tmp_path / "broken.pth"
    state = torch.load(alexnet_features)
    del state["features.3.weight"]
    torch.save(state, broken)
    with pytest.raises(ValueError, match=r"broken\.pth: missing tensor features\.3\.weight"):
        LpipsDistance(broken)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        LpipsDistance(tmp_path / "nope.pth")


def test_resize_policy():
    from proxytune.metrics import resize_policy

    images = [_noise(50, (80, 96)), _noise(51, (64, 64))]
    assert resize_policy(images, 0) == images
    assert [im.size for im in resize_policy(images, 32)] == [(32, 32), (32, 32)]

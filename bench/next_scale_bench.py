"""Next-scale (VAR) vs raster (LlamaGen) sampling time per image, side by side in one run: two small
random-init transformers with about the same parameter count, both drawing 256² images from a 4096-code
tokenizer (LlamaGen: 16×16 = 256 tokens, one forward each; VAR: 680 tokens over 10 scales, one forward per
scale), CFG on, KV cache on. Token sampling and decoding are timed separately; figures go to
bench/results/next_scale.json.
"""
from __future__ import annotations

import json
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ar_models.base import PromptBatch  # noqa: E402
from ar_models.llamagen import GPT, GPT_SIZES, LlamaGenStudent, VQConfig, VQModel  # noqa: E402
from ar_models.var import PATCH_NUMS_256, VAR, VAR_SIZES, VQ_SIZES, VQVAE, VARStudent, class_tokenizer  # noqa: E402

IMAGE, CODES, REPEATS = 256, 4096, 3
CLASSES = ["toy", "dog", "cat", "backpack"]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def var_student() -> VARStudent:
    config = replace(VAR_SIZES["d16"], depth=6, embed_dim=384, num_heads=6, num_classes=len(CLASSES),
                     patch_nums=PATCH_NUMS_256)
    vae_config = replace(VQ_SIZES["tiny"], vocab_size=CODES, ch=32)  # 5 levels: 16x downsampling, as released
    var = VAR(config, vae_config.z_channels, CODES)
    return VARStudent(var, VQVAE(vae_config, config.patch_nums), class_tokenizer(CLASSES), IMAGE)


def llamagen_student(target_params: int) -> LlamaGenStudent:
    """The raster GPT at VAR's width, with the layer count that brings it closest to `target_params`."""
    from transformers import T5Config, T5EncoderModel

    base = replace(GPT_SIZES["B"], dim=384, n_head=6, vocab_size=CODES, caption_dim=64, block_size=256)
    sizes = {n: replace(base, n_layer=n) for n in range(2, 24)}
    counts = {n: n_params(GPT(c)) for n, c in sizes.items() if n in (2, 3)}
    per_layer, fixed = counts[3] - counts[2], counts[2] - 2 * (counts[3] - counts[2])
    n_layer = max(1, round((target_params - fixed) / per_layer))
    gpt = GPT(sizes[n_layer])
    vq = VQModel(VQConfig(codebook_size=CODES, ch=32, ch_mult=(1, 1, 2, 2, 4), z_channels=8))
    t5 = T5EncoderModel(T5Config(vocab_size=8, d_model=64, d_kv=4, d_ff=8, num_layers=1, num_heads=1))
    return LlamaGenStudent(gpt, vq, t5, types.SimpleNamespace(), image_size=IMAGE)


def best(fn) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    var = var_student().eval()
    raster = llamagen_student(n_params(var.var)).eval()
    caption = torch.randn(1, raster.gpt.config.cls_token_num, 64) * 0.1
    raster_cond = PromptBatch(caption, torch.ones(1, caption.shape[1], dtype=torch.bool))
    var_cond = var.encode_prompts(["a toy"])
    sampling = {"cfg_scale": 4.0, "top_k": 600, "top_p": 1.0, "seed": 0}

    var_tokens = var.sample_tokens(var_cond, **sampling)
    raster_tokens = raster.sample_tokens(raster_cond, **sampling)
    rows = {
        "next_scale_var": {"params": n_params(var.var), "tokens": var_tokens.shape[1],
                           "forwards": len(var.var.config.patch_nums),
                           "sample_s": best(lambda: var.sample_tokens(var_cond, **sampling)),
                           "decode_s": best(lambda: var.decode_tokens(var_tokens))},
        "raster_llamagen": {"params": n_params(raster.gpt), "tokens": raster_tokens.shape[1],
                            "forwards": raster_tokens.shape[1],
                            "sample_s": best(lambda: raster.sample_tokens(raster_cond, **sampling)),
                            "decode_s": best(lambda: raster.decode_tokens(raster_tokens))},
    }
    ratio = rows["raster_llamagen"]["sample_s"] / rows["next_scale_var"]["sample_s"]
    print(f"256² images, {CODES}-code tokenizers, CFG 4, KV cache, batch 1, {torch.get_num_threads()} threads, "
          f"best of {REPEATS}")
    for name, r in rows.items():
        print(f"  {name:16s} {r['params'] / 1e6:5.1f}M params  {r['tokens']:4d} tokens in {r['forwards']:3d} forwards"
              f"  sampling {r['sample_s'] * 1e3:7.0f} ms/image  decode {r['decode_s'] * 1e3:5.0f} ms")
    print(f"  next-scale samples {ratio:.1f}x faster per image than raster at the same size")
    out = REPO / "bench" / "results" / "next_scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "raster_over_next_scale": ratio}, indent=2))


if __name__ == "__main__":
    main()

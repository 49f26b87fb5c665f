"""LlamaGen sampling benchmark on a ~100M-parameter GPT (size "B"), 256 image tokens (16x16), random init.

Side by side in one run, through `LlamaGenStudent.sample_tokens` (the code path `generate` uses):
- tokens/s with the KV cache vs recomputing the whole sequence each step, fp32 and bf16 autocast, batch 1 with
  CFG (2 rows) and a batch of 4 prompts (8 rows);
- the decode step's time against the memory-bandwidth bound: bytes a step must read (weights in the dtype the
  matmuls use, plus the KV cache) divided by the copy bandwidth measured here;
- cached and uncached sampling give identical tokens for a seed (asserted in fp32).

Recomputing 256 steps of a 100M model takes minutes on 2 cores, so the uncached path is timed as the forward
`sample_tokens(use_cache=False)` runs at evenly spaced steps and interpolated over all 256 steps (its cost is
close to linear in the sequence length); the output says so. The caption is a hand-made `PromptBatch` of random
features (the T5 encoder and the VQ are not needed to sample tokens). Writes bench/results/sampling.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ar_models.base import PromptBatch  # noqa: E402
from ar_models.llamagen import GPT, GPT_SIZES, LlamaGenStudent, VQConfig, VQModel  # noqa: E402
from ar_models.sampling import sample_logits  # noqa: E402

SAMPLING = {"cfg_scale": 7.5, "temperature": 1.0, "top_k": 1000, "top_p": 1.0}  # LlamaGen's t2i sampling defaults
UNCACHED_POINTS = (0, 64, 128, 192, 255)  # image tokens already generated when the timed forward runs
PROMPT_LENGTHS = (17, 9, 30, 24)  # real caption tokens per prompt (left-padded to cls_token_num)


def build_student(gpt: GPT) -> LlamaGenStudent:
    """A student around `gpt`; the VQ and the text encoder only satisfy the constructor (never run here)."""
    from transformers import T5Config, T5EncoderModel

    cfg = gpt.config
    grid = round(cfg.block_size**0.5)
    vq = VQModel(VQConfig(codebook_size=cfg.vocab_size, ch=32, ch_mult=(1, 2), z_channels=32))
    t5 = T5EncoderModel(T5Config(vocab_size=8, d_model=cfg.caption_dim, d_kv=4, d_ff=8, num_layers=1, num_heads=1))
    return LlamaGenStudent(gpt, vq, t5, types.SimpleNamespace(), image_size=grid * vq.config.downsample)


def make_prompts(cfg, n: int) -> PromptBatch:
    """n left-padded captions of random T5-like features (zeros in padded slots, as encode_prompts makes)."""
    g = torch.Generator().manual_seed(1)
    T = cfg.cls_token_num
    lengths = torch.tensor(PROMPT_LENGTHS[:n])
    mask = torch.arange(T)[None] >= T - lengths[:, None]
    feats = torch.randn(n, T, cfg.caption_dim, generator=g) * 0.1
    return PromptBatch(feats * mask[..., None], mask)


def best_time(fn, repeats: int):
    """Fastest of `repeats` calls (the machine is shared: the minimum is the least disturbed) and the result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def bandwidth(gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Copy bandwidth (bytes read + bytes written per second) and read bandwidth (a sum), in GB/s."""
    a = torch.ones(int(gib * 2**30) // 4)
    b = torch.empty_like(a)
    copy_s, _ = best_time(lambda: b.copy_(a), repeats)
    read_s, _ = best_time(lambda: a.sum(), repeats)
    return {"buffer_gib": gib, "copy_gbps": 2 * a.nbytes / copy_s / 1e9, "read_gbps": a.nbytes / read_s / 1e9}


@torch.no_grad()
def thin_gemm(gpt: GPT, rows: int = 2, repeats: int = 20) -> dict[str, dict[str, float]]:
    """The matrix products of one decode step alone: `rows` activations times every layer and head weight, with the
    weights already in the dtype (no casts, no attention, no Python between layers). Its weight bytes over its time
    is the bandwidth the GEMM kernels themselves reach at this shape, the ceiling of any decode step built on them."""
    weights = [p for n, p in gpt.named_parameters()
               if n.endswith(".weight") and p.dim() == 2 and n.startswith(("layers.", "output."))]
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        mats = [w.detach().to(dtype).contiguous() for w in weights]
        x = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=dtype) for w in mats}
        seconds, _ = best_time(lambda: [torch.nn.functional.linear(x[w.shape[1]], w) for w in mats], repeats)
        nbytes = sum(w.numel() * w.element_size() for w in mats)
        out[str(dtype).removeprefix("torch.")] = {"ms": seconds * 1e3, "weight_bytes": nbytes,
                                                  "gbps": nbytes / seconds / 1e9}
    return out


def step_bytes(gpt: GPT, rows: int, kv_len: int, weight_bytes: int, kv_bytes: int) -> dict[str, int]:
    """Bytes one decode step must read: every matrix of the layers and the output head (one embedding row per
    row), norm weights in fp32, and K and V of every layer over kv_len positions."""
    cfg = gpt.config
    matrices = sum(p.numel() for n, p in gpt.named_parameters()
                   if n.endswith(".weight") and p.dim() == 2 and n.startswith(("layers.", "output.")))
    norms = sum(p.numel() for n, p in gpt.named_parameters() if p.dim() == 1)
    weights = matrices * weight_bytes + norms * 4 + rows * cfg.dim * 4
    kv = 2 * cfg.n_layer * rows * kv_len * cfg.dim * kv_bytes
    return {"weights": weights, "kv": kv, "total": weights + kv}


def cfg_rows(cond: PromptBatch, gpt: GPT) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption and mask with the unconditional rows appended, as sample_tokens builds them."""
    uncond = gpt.cls_embedding.uncond_embedding.expand(cond.features.shape[0], -1, -1)
    return torch.cat([cond.features, uncond]), torch.cat([cond.mask, cond.mask])


@torch.no_grad()
def decode_step_ms(gpt: GPT, cond: PromptBatch, autocast: bool, repeats: int) -> tuple[float, int]:
    """Forward of one new token per row at mid-sequence (T + N/2 positions cached), as sample_tokens calls it;
    the mid step's KV length is the average over a sampling run. Returns (ms, cached positions read)."""
    cfg = gpt.config
    T, N = cfg.cls_token_num, cfg.block_size
    caption, mask = cfg_rows(cond, gpt)
    tokens = torch.randint(cfg.vocab_size, (caption.shape[0], N // 2 + 1), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        caches = gpt.new_caches(T + N)
        gpt(None, caption, mask, caches=caches)
        gpt(tokens[:, :-1], None, mask, start_pos=T, caches=caches)
        step = lambda: gpt(tokens[:, -1:], None, mask, start_pos=T + N // 2, caches=caches)  # noqa: E731
        step()  # warm-up (and, under autocast, fills its cache of bf16 weight copies)
        seconds, _ = best_time(step, repeats)
    return seconds * 1e3, T + N // 2 + 1


@torch.no_grad()
def uncached_forward_s(gpt: GPT, cond: PromptBatch, tokens: torch.Tensor, autocast: bool, repeats: int) -> dict:
    """Seconds of the whole-sequence forward sample_tokens(use_cache=False) runs after j generated tokens, at
    UNCACHED_POINTS, plus the interpolated sum over the N forwards of a sampling run (j = 0 .. N-1)."""
    caption, mask = cfg_rows(cond, gpt)
    tokens = torch.cat([tokens, tokens])
    times = {}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        gpt(tokens[:, :8], caption, mask)  # warm-up
        for j in UNCACHED_POINTS:
            times[j], _ = best_time(lambda: gpt(tokens[:, :j] if j else None, caption, mask), repeats)
    total = float(np.interp(np.arange(gpt.config.block_size), list(times), list(times.values())).sum())
    return {"forward_s_at": times, "forwards_total_s": total}


def sampling_overhead_s(cfg, rows: int, repeats: int) -> float:
    """Per-step cost outside the forward (CFG mix, top-k sampling): the same with and without the cache."""
    logits = torch.randn(2 * rows, cfg.vocab_size)
    g = torch.Generator().manual_seed(0)

    def step():
        c, u = logits.chunk(2)
        return sample_logits(u + (c - u) * SAMPLING["cfg_scale"], SAMPLING["temperature"], SAMPLING["top_k"],
                             SAMPLING["top_p"], g)

    seconds, _ = best_time(lambda: [step() for _ in range(20)], repeats)
    return seconds / 20


def identity_check(student: LlamaGenStudent, cond: PromptBatch, autocast: bool) -> dict:
    """Full sample_tokens runs with and without the cache; the tokens must be equal."""
    cached = student.sample_tokens(cond, seed=0, use_cache=True, autocast=autocast, **SAMPLING)
    uncached = student.sample_tokens(cond, seed=0, use_cache=False, autocast=autocast, **SAMPLING)
    return {"tokens": cached.shape[1], "equal": bool(torch.equal(cached, uncached)),
            "first_mismatch": int((cached != uncached).any(0).nonzero()[0]) if not torch.equal(cached, uncached)
            else None}


def loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats of each full sampling run")
    parser.add_argument("--size", default="B", choices=sorted(GPT_SIZES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), loadavg()
    print(f"torch {torch.__version__}, {args.threads} threads (os.cpu_count()={os.cpu_count()}), "
          f"load average {load_before}")
    if load_before and load_before[0] > os.cpu_count():
        print("WARNING: the machine is busy; multi-threaded timings then include threads waiting for descheduled "
              "peers, and every figure is inflated. Rerun on an idle machine, or with --threads 1.")

    torch.manual_seed(0)
    cfg = replace(GPT_SIZES[args.size], block_size=256)
    gpt = GPT(cfg).eval()
    student = build_student(gpt)
    T, N = cfg.cls_token_num, cfg.block_size
    n_params = sum(p.numel() for p in gpt.parameters())
    print(f"LlamaGen GPT-{args.size}: {n_params / 1e6:.1f}M parameters, dim {cfg.dim}, {cfg.n_layer} layers, "
          f"vocab {cfg.vocab_size}, caption prefix {T}, {N} image tokens; sampling {SAMPLING}")

    bw = bandwidth()
    print(f"memory: copy {bw['copy_gbps']:.1f} GB/s (read + write counted), read {bw['read_gbps']:.1f} GB/s "
          f"({bw['buffer_gib']:.0f} GiB buffers)")

    # ---- identity: cached == uncached (fp32 asserted). Full 256-token uncached runs of the 100M model take minutes,
    # so the same weights sample a 4x4 grid (16 tokens), and a narrow model samples the full 16x16 grid.
    small_grid = GPT(replace(cfg, block_size=16)).eval()
    small_grid.load_state_dict(gpt.state_dict())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        narrow = GPT(replace(cfg, dim=64, n_layer=2, n_head=1)).eval()
    one = make_prompts(cfg, 1)
    identity = {
        f"GPT-{args.size} weights, 16 tokens, fp32": identity_check(build_student(small_grid), one, False),
        f"GPT-{args.size} weights, 16 tokens, bf16": identity_check(build_student(small_grid), one, True),
        "dim 64 x 2 layers, 256 tokens, fp32": identity_check(build_student(narrow), one, False),
    }
    del small_grid, narrow
    print("\ncached vs uncached tokens, same seed:")
    for name, r in identity.items():
        print(f"  {name:<40} {'identical' if r['equal'] else 'DIFFER from token ' + str(r['first_mismatch'])}")
    for name, r in identity.items():
        assert r["equal"] or "bf16" in name, f"cached and uncached sampling differ: {name}: {r}"

    # ---- full sampling runs with the cache
    runs = {}
    for batch in (1, 4):
        cond = make_prompts(cfg, batch)
        for autocast in (False, True):
            seconds, tokens = best_time(lambda: student.sample_tokens(
                cond, seed=0, use_cache=True, autocast=autocast, **SAMPLING), args.repeats)
            runs[(batch, autocast)] = {"seconds": seconds, "tokens_per_s": batch * N / seconds, "tokens": tokens}

    # ---- without the cache (batch 1): timed forwards at evenly spaced steps, interpolated over the 256 steps
    overhead = sampling_overhead_s(cfg, 1, 3)
    uncached = {}
    for autocast in (False, True):
        u = uncached_forward_s(gpt, one, runs[(1, autocast)]["tokens"], autocast, 1)
        u["seconds"] = u["forwards_total_s"] + N * overhead
        u["tokens_per_s"] = N / u["seconds"]
        uncached[autocast] = u

    print(f"\nsampling {N} image tokens, batch 1 with CFG (2 rows per step); uncached time = forwards timed after "
          f"{list(UNCACHED_POINTS)} tokens, interpolated over all {N} steps, + {N} x {overhead * 1e3:.2f} ms sampling")
    print(f"{'':<16}{'cached tok/s':>14}{'uncached tok/s':>16}{'speed-up':>10}{'cached s':>10}{'uncached s':>12}")
    for autocast in (False, True):
        c, u = runs[(1, autocast)], uncached[autocast]
        print(f"{'bf16 autocast' if autocast else 'fp32':<16}{c['tokens_per_s']:14.1f}{u['tokens_per_s']:16.2f}"
              f"{c['tokens_per_s'] / u['tokens_per_s']:9.1f}x{c['seconds']:10.1f}{u['seconds']:11.0f}*")
    print("  * estimated; forward seconds at those steps: fp32 "
          + ", ".join(f"{v:.2f}" for v in uncached[False]["forward_s_at"].values()) + "; bf16 "
          + ", ".join(f"{v:.2f}" for v in uncached[True]["forward_s_at"].values()))

    print(f"\nbatch generation with the KV cache ({N} tokens per image, CFG doubles the rows)")
    print(f"{'':<16}{'1 prompt tok/s':>16}{'4 prompts tok/s':>17}{'ratio':>8}")
    for autocast in (False, True):
        one_tps, four_tps = runs[(1, autocast)]["tokens_per_s"], runs[(4, autocast)]["tokens_per_s"]
        print(f"{'bf16 autocast' if autocast else 'fp32':<16}{one_tps:16.1f}{four_tps:17.1f}{four_tps / one_tps:7.2f}x")

    # ---- the decode step against the memory-bandwidth bound
    decode = {}
    cases = [("fp32", 1, False, 4), ("bf16 autocast", 1, True, 2), ("fp32", 4, False, 4), ("bf16 autocast", 4, True, 2)]
    for name, batch, autocast, weight_bytes in cases:
        ms, kv_len = decode_step_ms(gpt, make_prompts(cfg, batch), autocast, 5)
        decode[f"{name}, {batch} prompt(s)"] = (ms, batch, weight_bytes, kv_len)
    # Under autocast, weights that do not require grad (frozen base weights, e.g. peft LoRA) are re-cast every call.
    gpt.requires_grad_(False)
    ms, kv_len = decode_step_ms(gpt, one, True, 3)
    gpt.requires_grad_(True)
    decode["bf16 autocast, frozen weights, 1 prompt(s)"] = (ms, 1, 2, kv_len)

    print(f"\ndecode step at mid-sequence ({T + N // 2} cached positions), forward only, vs bytes read / copy bandwidth")
    print(f"{'':<44}{'step ms':>9}{'MB read':>9}{'bound ms':>10}{'actual/bound':>14}")
    decode_out = {}
    for name, (ms, batch, weight_bytes, kv_len) in decode.items():
        nbytes = step_bytes(gpt, 2 * batch, kv_len, weight_bytes, weight_bytes)
        bound_ms = nbytes["total"] / (bw["copy_gbps"] * 1e9) * 1e3
        read_bound_ms = nbytes["total"] / (bw["read_gbps"] * 1e9) * 1e3
        print(f"{name:<44}{ms:9.1f}{nbytes['total'] / 1e6:9.0f}{bound_ms:10.1f}{ms / bound_ms:13.2f}x")
        decode_out[name] = {"step_ms": ms, "rows": 2 * batch, "kv_positions": kv_len, "bytes": nbytes,
                            "bound_ms_copy_bw": bound_ms, "bound_ms_read_bw": read_bound_ms,
                            "actual_over_bound": ms / bound_ms}
    print("  (frozen weights under autocast also read fp32 weights and write bf16 copies every step: "
          "the bound shown counts bf16 weights only)")
    gemm = thin_gemm(gpt)
    print("  the step's matrix products alone (2 rows x every weight, weights pre-cast): "
          + "; ".join(f"{name} {g['ms']:.1f} ms = {g['gbps']:.1f} GB/s of weights read" for name, g in gemm.items())
          + f" (read bandwidth {bw['read_gbps']:.1f} GB/s): the kernels' own ceiling at this shape")
    for autocast in (False, True):
        per_step = runs[(1, autocast)]["seconds"] / N * 1e3
        print(f"  in a full batch-1 run ({'bf16' if autocast else 'fp32'}): {per_step:.1f} ms per token "
              f"(prefill, top-k sampling and the step overhead included)")

    elapsed, load_after = time.perf_counter() - started, loadavg()
    print(f"\ntotal bench time {elapsed:.0f} s, load average before {load_before}, after {load_after}"
          f" (a busy machine inflates every time; ratios are measured side by side)")

    results = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "load_before": load_before, "load_after": load_after},
        "model": {"size": args.size, "parameters": n_params, "dim": cfg.dim, "n_layer": cfg.n_layer,
                  "vocab_size": cfg.vocab_size, "cls_token_num": T, "image_tokens": N},
        "sampling": SAMPLING,
        "bandwidth": bw,
        "identity": identity,
        "cached": {f"{'bf16' if ac else 'fp32'}_batch{b}": {k: v for k, v in r.items() if k != "tokens"}
                   for (b, ac), r in runs.items()},
        "uncached_batch1": {("bf16" if ac else "fp32"): {**u, "estimated": True,
                                                          "forward_s_at": {str(k): v for k, v in u["forward_s_at"].items()}}
                            for ac, u in uncached.items()},
        "speedup_cache_batch1": {("bf16" if ac else "fp32"): runs[(1, ac)]["tokens_per_s"] / uncached[ac]["tokens_per_s"]
                                 for ac in (False, True)},
        "sampling_overhead_ms_per_step": overhead * 1e3,
        "decode_step": decode_out,
        "thin_gemm_2_rows": gemm,
        "bench_seconds": elapsed,
    }
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampling.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'sampling.json'}")


if __name__ == "__main__":
    main()

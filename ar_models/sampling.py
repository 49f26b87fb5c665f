"""Sampling pieces the families share: token filtering and guidance, the next-scale KV cache, and the bf16 weight
cache that makes autocast decoding pay off."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of logits (B, V): temperature, then top-k, then nucleus filtering."""
    logits = logits / max(temperature, 1e-5)
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs > top_p  # mass before a token already exceeds top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


def sample_guided(logits: torch.Tensor, cfg_scale: float, temperature: float, top_k: int, top_p: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """`sample_logits` after classifier-free guidance: with cfg_scale != 1 the rows are [cond; uncond] and one token
    is drawn per pair from uncond + cfg_scale * (cond - uncond)."""
    if cfg_scale != 1.0:
        c, u = logits.chunk(2)
        logits = u + (c - u) * cfg_scale
    return sample_logits(logits, temperature, top_k, top_p, generator)


class ScaleKVCache:
    """One layer's self-attention keys/values (B, H, L, hd), grown by a whole scale per step: next-scale models
    (VAR, Infinity) attend from each scale to all earlier ones."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


@contextlib.contextmanager
def bf16_weight_cache(module: nn.Module, enabled: bool):
    """Let autocast cast each frozen weight to bf16 once per sampling run instead of once per decode step.

    torch.autocast caches its bf16 copies only for leaf weights that require grad, so a frozen model (or peft's
    frozen base layers) is re-cast every step, which made bf16 decoding slower than fp32. Sampling runs under
    no_grad, so marking the weights for its duration builds no graph; they are restored afterwards."""
    frozen = [p for p in module.parameters() if enabled and not p.requires_grad and p.is_floating_point()]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)

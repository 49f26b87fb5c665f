"""Infinity text-to-image student (Han et al. 2025, "Infinity: Scaling Bitwise AutoRegressive Modeling").

A next-scale transformer: the image is a pyramid of residual bit maps (1x1, 2x2, ... up to the latent grid),
each scale predicted at once from the upsampled sum of the earlier scales' codes, with a block-causal mask
over scales. Every position predicts its d bits independently (the bitwise head: 2 logits per bit), so the
"vocabulary" is 2^d without a 2^d-way softmax. Text enters three ways, as in Infinity: attentively pooled
flan-T5 features give the start token and the shared AdaLN condition, and every block cross-attends to the
projected features. The BSQ tokenizer quantises each scale's residual to the signs of its d channels.

Module, parameter and buffer names match the released `infinity_2b_reg.pth` and `infinity_vae_d32_reg.pth`
key for key (the 2B model stores its 32 blocks as 8 `block_chunks` of 4), so official weights load with no
renaming and weights saved from these modules have the release's layout.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ar_models.base import PromptBatch, T5Student, weighted_cross_entropy
from ar_models.loading import load_strict, pick
from ar_models.sampling import ScaleKVCache

# Side lengths of the square scale pyramid (Infinity's 1:1 schedule; 13 scales reach 64x64 = 1024 px at
# stride 16). An image uses the prefix that ends at its latent grid, exactly as the 0.06M/0.25M/1M presets do.
SCALES = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)
ROPE_GRID = 64  # rope positions are spread over the 1M grid at every scale (rope2d_normalized_by_hw=2)


def scale_schedule(grid: int) -> tuple[int, ...]:
    if grid not in SCALES:
        raise ValueError(f"latent grid {grid}x{grid} is not a scale of Infinity's schedule {SCALES}")
    return SCALES[: SCALES.index(grid) + 1]


# -----------------------------------------------------------------------------
# Transformer


@dataclass(frozen=True)
class InfinityConfig:
    embed_dim: int = 2048
    depth: int = 32
    num_heads: int = 16
    mlp_ratio: float = 4.0
    block_chunks: int = 8  # the release groups blocks into chunks; only the key names depend on it
    d_vae: int = 32  # bits per position (= BSQ codebook_dim)
    text_channels: int = 2048  # flan-t5-xl width
    text_maxlen: int = 512  # rows of the learned unconditional caption
    pool_head_dim: int = 128  # attentive text pool: text_channels // pool_head_dim heads
    norm_eps: float = 1e-6
    rope_base: float = 10000.0


INFINITY_SIZES: dict[str, InfinityConfig] = {
    "tiny": InfinityConfig(embed_dim=64, depth=4, num_heads=4, block_chunks=2, d_vae=8, text_channels=32,
                           text_maxlen=32, pool_head_dim=16),
    "2b": InfinityConfig(),  # infinity_2b_reg.pth
}


class RMSNorm(nn.Module):  # own copy of llamagen's: Infinity scales by the weight before casting back, LlamaGen after
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).type_as(x)


def rope_2d(schedule: tuple[int, ...], head_dim: int, base: float) -> torch.Tensor:
    """(N, head_dim // 2, 2) cos/sin: half the pairs rotate with the row, half with the column, positions
    stretched so every scale spans the same ROPE_GRID extent (a coarse token sits where it would at 64x64)."""
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2).float() / half))
    angles = []
    for s in schedule:
        pos = (torch.arange(s) * (ROPE_GRID / s)).round()
        rows, cols = pos[:, None].expand(s, s).reshape(-1), pos[None, :].expand(s, s).reshape(-1)
        angles.append(torch.cat([torch.outer(rows, inv_freq), torch.outer(cols, inv_freq)], dim=-1))
    a = torch.cat(angles)
    return torch.stack([a.cos(), a.sin()], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x (B, H, L, hd) by rope (L, hd // 2, 2), in fp32."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = rope[..., 0], rope[..., 1]
    out = torch.stack([xf[..., 0] * cos - xf[..., 1] * sin, xf[..., 1] * cos + xf[..., 0] * sin], dim=-1)
    return out.flatten(-2).type_as(x)


class SelfAttention(nn.Module):
    """Cosine attention: unit q/k with a learned per-head scale (clamped at 100), 2-D rope, no k bias."""

    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, n_head, 1, 1), 4.0).log())
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope, mask, cache: ScaleKVCache | None) -> torch.Tensor:
        B, L, C = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        # the module call (not F.linear on its weight, as upstream does) so LoRA wrappers take effect
        q, k, v = (self.mat_qkv(x) + bias).view(B, L, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        scale = self.scale_mul_1H11.clamp_max(math.log(100.0)).exp()
        q = apply_rope(F.normalize(q, dim=-1, eps=1e-12) * scale, rope)
        k = apply_rope(F.normalize(k, dim=-1, eps=1e-12), rope)
        if cache is not None:
            k, v = cache.update(k, v)
        y = F.scaled_dot_product_attention(q, k.type_as(v), v, attn_mask=mask, scale=1.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class CrossAttention(nn.Module):
    """Queries attend to the valid text tokens of their own row. With `pool`, the query is one learned vector
    per head (Infinity's attentive text pool)."""

    def __init__(self, dim: int, kv_dim: int, n_head: int, pool: bool = False):
        super().__init__()
        self.n_head, self.head_dim = n_head, dim // n_head
        if pool:
            self.mat_q = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, n_head, self.head_dim),
                                                            std=math.sqrt(1 / dim / 3)))
        else:
            self.mat_q = nn.Linear(dim, dim)
        self.mat_kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor | None, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = text.shape
        kv = self.mat_kv(text) + torch.cat([self.zero_k_bias, self.v_bias])
        k, v = kv.view(B, T, 2, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        if isinstance(self.mat_q, nn.Parameter):
            q = self.mat_q[:, :, None].expand(B, -1, -1, -1).to(k.dtype)
        else:
            q = self.mat_q(x).view(B, x.shape[1], self.n_head, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=text_mask[:, None, None, :])
        return self.proj(y.transpose(1, 2).reshape(B, q.shape[2], -1))


class TextAttentivePool(nn.Module):
    def __init__(self, text_channels: int, dim: int, head_dim: int):
        super().__init__()
        self.ca = CrossAttention(dim, text_channels, text_channels // head_dim, pool=True)

    def forward(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.ca(None, text, mask).squeeze(1)


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CrossAttnBlock(nn.Module):
    """AdaLN self-attention, plain-LN cross-attention to the text, AdaLN FFN. The six AdaLN vectors are a
    per-block learned offset (`ada_gss`) plus the text condition through the shared `shared_ada_lin`."""

    def __init__(self, c: InfinityConfig):
        super().__init__()
        C = c.embed_dim
        self.sa = SelfAttention(C, c.num_heads)
        self.ca = CrossAttention(C, C, c.num_heads)
        self.ffn = FFN(C, round(C * c.mlp_ratio / 256) * 256)
        self.ln_wo_grad = nn.LayerNorm(C, eps=c.norm_eps, elementwise_affine=False)
        self.ca_norm = nn.LayerNorm(C, eps=c.norm_eps)
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)

    def forward(self, x, gss, text, text_mask, rope, mask, cache):
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + gss).unbind(2)
        x = x + self.sa(self.ln_wo_grad(x) * (scale1 + 1) + shift1, rope, mask, cache) * gamma1
        x = x + self.ca(self.ca_norm(x), text, text_mask)
        return x + self.ffn(self.ln_wo_grad(x) * (scale2 + 1) + shift2) * gamma2


class BlockChunk(nn.Module):
    def __init__(self, blocks: list[CrossAttnBlock]):
        super().__init__()
        self.module = nn.ModuleList(blocks)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.ln_wo_grad = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, x.shape[-1]).unbind(2)
        return self.ln_wo_grad(x) * (scale + 1) + shift


@dataclass
class TextContext:
    """What every forward needs from the caption, computed once per batch (and per sampling run)."""

    cond: torch.Tensor  # (B, C) pooled text: start token and AdaLN condition
    gss: torch.Tensor  # (B, 1, 6, C) shared AdaLN vectors
    text: torch.Tensor  # (B, T, C) cross-attention keys/values input
    mask: torch.Tensor  # (B, T) bool


class Infinity(nn.Module):
    """The sequence is the scale pyramid flattened scale by scale; position 0 (the 1x1 scale) is the start
    token, every later scale reads the codes accumulated so far, resized to its grid."""

    def __init__(self, config: InfinityConfig, schedule: tuple[int, ...]):
        super().__init__()
        c, C = config, config.embed_dim
        self.config, self.schedule = config, schedule
        if c.depth % c.block_chunks:
            raise ValueError(f"depth {c.depth} is not a multiple of block_chunks {c.block_chunks}")
        init_std = math.sqrt(1 / C / 3)
        uncond = torch.empty(c.text_maxlen, c.text_channels)
        nn.init.trunc_normal_(uncond, std=1.2, generator=torch.Generator().manual_seed(0))
        self.cfg_uncond = nn.Parameter(uncond / c.text_channels**0.5)  # the learned "empty caption"
        self.text_norm = RMSNorm(c.text_channels, c.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(c.text_channels, C, c.pool_head_dim)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(c.text_channels, C), nn.GELU(approximate="tanh"),
                                              nn.Linear(C, C))
        self.pos_start = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, 1, C), std=init_std))
        self.lvl_embed = nn.Embedding(15, C)
        self.word_embed = nn.Linear(c.d_vae, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        per_chunk = c.depth // c.block_chunks
        self.block_chunks = nn.ModuleList(
            BlockChunk([CrossAttnBlock(c) for _ in range(per_chunk)]) for _ in range(c.block_chunks))
        self.head_nm = AdaLNBeforeHead(C, c.norm_eps)
        self.head = nn.Linear(C, 2 * c.d_vae)
        self._init_weights(init_std)
        ids = torch.cat([torch.full((s * s,), i) for i, s in enumerate(schedule)])
        self.register_buffer("scale_ids", ids, persistent=False)
        self.register_buffer("rope", rope_2d(schedule, C // c.num_heads, c.rope_base), persistent=False)
        self.offsets = [0]
        for s in schedule:
            self.offsets.append(self.offsets[-1] + s * s)
        self.gradient_checkpointing = False

    def _init_weights(self, init_std: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.lvl_embed.weight, std=init_std)

    @property
    def blocks(self) -> list[CrossAttnBlock]:
        return [b for chunk in self.block_chunks for b in chunk.module]

    def context(self, text: torch.Tensor, mask: torch.Tensor) -> TextContext:
        """text (B, T, text_channels): T5 features (or rows of `cfg_uncond`); mask (B, T) bool."""
        text = self.text_norm(text)
        cond = self.text_proj_for_sos(text, mask)
        gss = self.shared_ada_lin(cond).view(-1, 1, 6, self.config.embed_dim)
        return TextContext(cond, gss, self.text_proj_for_ca(text), mask)

    def new_caches(self) -> list[ScaleKVCache]:
        return [ScaleKVCache() for _ in self.blocks]

    def forward(self, ctx: TextContext, inputs: torch.Tensor | None, start: int = 0,
                caches: list[ScaleKVCache] | None = None) -> torch.Tensor:
        """Bit logits (B, L, d_vae, 2) for positions start..start+L-1.

        inputs (B, L', d_vae): the resized accumulated codes feeding the positions after the start token.
        Without caches pass the whole prefix from 0 (block-causal mask); with caches pass one new scale."""
        parts = [ctx.cond[:, None] + self.pos_start] if start == 0 else []
        if inputs is not None and inputs.shape[1]:
            parts.append(self.word_embed(inputs.to(self.word_embed.weight.dtype)))
        h = torch.cat(parts, dim=1)
        end = start + h.shape[1]
        ids = self.scale_ids[:end]
        h = h + self.lvl_embed(ids[start:])  # Infinity adds the scale embedding before the first block only
        mask = None if caches is not None else ids[start:, None] >= ids[None, :]
        rope = self.rope[start:end]
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and caches is None and torch.is_grad_enabled():
                h = checkpoint(block, h, ctx.gss, ctx.text, ctx.mask, rope, mask, None, use_reentrant=False)
            else:
                h = block(h, ctx.gss, ctx.text, ctx.mask, rope, mask, None if caches is None else caches[i])
        logits = self.head(self.head_nm(h.float(), ctx.cond.float()))
        return logits.float().view(*h.shape[:2], self.config.d_vae, 2)


# -----------------------------------------------------------------------------
# BSQ tokenizer


@dataclass(frozen=True)
class BSQVAEConfig:
    codebook_dim: int = 32  # bits per position; the "vocabulary" is 2^codebook_dim
    base_ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2
    patch_size: int = 16  # stride: log2(patch_size) levels downsample

    @property
    def n_resample(self) -> int:
        return int(math.log2(self.patch_size))


VAE_SIZES: dict[str, BSQVAEConfig] = {
    "tiny": BSQVAEConfig(codebook_dim=8, base_ch=32, ch_mult=(1, 1, 1, 2, 2), num_res_blocks=1),
    "d32": BSQVAEConfig(),  # infinity_vae_d32_reg.pth
}


class Conv(nn.Module):
    """nn.Conv2d under `.conv`, so keys read `<name>.conv.weight` as the release's wrapper writes them."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Normalize(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.GroupNorm(32 if ch % 32 == 0 else 24, ch, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


# Own copies of vq_blocks' ResnetBlock, Downsample, Upsample, Encoder and Decoder: the release wraps every conv and
# norm (`conv1.conv.weight`), groups norms by 24 where 32 does not divide, and has no attention.
class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1, self.conv1 = Normalize(in_ch), Conv(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = Normalize(out_ch), Conv(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = Conv(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(ch: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.block_2 = ResnetBlock(ch, ch), ResnetBlock(ch, ch)
    return mid


class Encoder(nn.Module):
    def __init__(self, c: BSQVAEConfig):
        super().__init__()
        self.conv_in = Conv(3, c.base_ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch_in = c.base_ch
        for i, mult in enumerate(c.ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                level.block.append(ResnetBlock(ch_in, c.base_ch * mult))
                ch_in = c.base_ch * mult
            if i < c.n_resample:
                level.downsample = Downsample(ch_in)
            self.down.append(level)
        self.mid = _mid(ch_in)
        self.norm_out = Normalize(ch_in)
        self.conv_out = Conv(ch_in, c.codebook_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: BSQVAEConfig):
        super().__init__()
        ch_in = c.base_ch * c.ch_mult[-1]
        self.conv_in = Conv(c.codebook_dim, ch_in, 3, padding=1)
        self.mid = _mid(ch_in)
        levels = []
        for i in reversed(range(len(c.ch_mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                level.block.append(ResnetBlock(ch_in, c.base_ch * c.ch_mult[i]))
                ch_in = c.base_ch * c.ch_mult[i]
            if 1 <= i <= c.n_resample:
                level.upsample = Upsample(ch_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)  # up[i] is resolution level i; run from the deepest
        self.norm_out = Normalize(ch_in)
        self.conv_out = Conv(ch_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class BSQ(nn.Module):
    """Binary spherical quantisation: a position's code is the sign pattern of its d channels on the unit
    sphere, (2 * bit - 1) / sqrt(d). `mask` (powers of two, for integer labels) is a constant."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("mask", 2 ** torch.arange(dim - 1, -1, -1), persistent=False)

    def bits_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        return (bits.float() * 2 - 1) / self.dim**0.5


class MultiScaleBSQ(nn.Module):
    """Residual quantisation over the scale pyramid: each scale quantises the area-downsampled residual; its
    codes, upsampled (bilinear = Infinity's trilinear on one frame), are subtracted from the residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.lfq = BSQ(dim)


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode=mode)


class BSQVAE(nn.Module):
    def __init__(self, config: BSQVAEConfig):
        super().__init__()
        self.config = config
        self.encoder, self.decoder = Encoder(config), Decoder(config)
        self.quantizer = MultiScaleBSQ(config.codebook_dim)

    def bits_to_maps(self, bits: torch.Tensor, schedule: tuple[int, ...]) -> list[torch.Tensor]:
        """Bit tokens (B, N, d) -> each scale's codes (B, d, s, s)."""
        maps, start = [], 0
        for s in schedule:
            chunk = bits[:, start:start + s * s]
            maps.append(self.quantizer.lfq.bits_to_codes(chunk).transpose(1, 2).reshape(len(bits), -1, s, s))
            start += s * s
        return maps

    def quantize(self, h: torch.Tensor, schedule: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent (B, d, H, W) -> bit tokens (B, N, d) long and the quantised latent they decode from."""
        grid, residual, summed, bits = h.shape[-1], h.float(), 0.0, []
        for s in schedule:
            b = _resize(residual, s, "area") > 0
            bits.append(b.flatten(2).transpose(1, 2))
            q = _resize(self.quantizer.lfq.bits_to_codes(b), grid, "bilinear")
            residual, summed = residual - q, summed + q
        return torch.cat(bits, dim=1).long(), summed

    def encode(self, images: torch.Tensor, schedule: tuple[int, ...]) -> torch.Tensor:
        return self.quantize(self.encoder(images), schedule)[0]

    def latent(self, bits: torch.Tensor, schedule: tuple[int, ...]) -> torch.Tensor:
        summed = 0.0
        for codes in self.bits_to_maps(bits, schedule):
            summed = summed + _resize(codes, schedule[-1], "bilinear")
        return summed

    def decode(self, bits: torch.Tensor, schedule: tuple[int, ...]) -> torch.Tensor:
        return self.decoder(self.latent(bits, schedule)).clamp(-1, 1)


def next_scale_inputs(maps: list[torch.Tensor], schedule: tuple[int, ...], mode: str) -> torch.Tensor:
    """Transformer inputs for scales 1..len(maps) (B, L, d): the codes of scales 0..k-1, upsampled to the
    latent grid and summed, then resized to scale k. Infinity trains with `area` and samples with bilinear."""
    grid, summed, out = schedule[-1], 0.0, []
    for si, codes in enumerate(maps):
        summed = summed + _resize(codes, grid, "bilinear")
        if si + 1 < len(schedule):
            out.append(_resize(summed, schedule[si + 1], mode).flatten(2).transpose(1, 2))
    return torch.cat(out, dim=1)


# -----------------------------------------------------------------------------
# Checkpoints

# buffers the official Infinity.load_state_dict drops from checkpoints
_INFINITY_EXTRAS = re.compile(r"lvl_1L|attn_bias_for_masking|Infinity_visible_kvlen|Infinity_invisible_qlen")
# BSQ's constant bit mask, stored under both names of the release's aliased quantizer
_VAE_EXTRAS = re.compile(r"quantizer?\.lfq\.mask")


def _torch_load(path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__})") from None


def load_infinity_checkpoint(path: str | os.PathLike, config: InfinityConfig, schedule: tuple[int, ...]) -> Infinity:
    """`infinity_*.pth` (a plain state dict, or a full training checkpoint's trainer.gpt_fsdp) -> Infinity in
    eval mode; ValueError naming the file and tensors on any mismatch."""
    state = _torch_load(path)
    if isinstance(state.get("trainer"), dict) and "gpt_fsdp" in state["trainer"]:
        state = state["trainer"]["gpt_fsdp"]
    model = Infinity(config, schedule)
    load_strict(model, path, state, _INFINITY_EXTRAS)
    return model.eval()


def _release_vae_key(key: str, expected: dict) -> str:
    """The release's loader also accepts conv/norm weights without their wrapper level (`x.weight` for
    `x.conv.weight` / `x.norm.weight`); map those to our names."""
    if key in expected:
        return key
    stem, _, leaf = key.rpartition(".")
    for wrapper in ("conv", "norm"):
        if f"{stem}.{wrapper}.{leaf}" in expected:
            return f"{stem}.{wrapper}.{leaf}"
    return key


def load_vae_checkpoint(path: str | os.PathLike, config: BSQVAEConfig) -> BSQVAE:
    """`infinity_vae_*.pth` ({"vae": state_dict}) -> BSQVAE in eval mode; ValueError on any mismatch."""
    state = _torch_load(path)
    if "vae" not in state:
        raise ValueError(f"{path}: no 'vae' entry (an Infinity BSQ-VAE checkpoint holds {{'vae': state_dict}})")
    model = BSQVAE(config)
    expected = model.state_dict()
    load_strict(model, path, {_release_vae_key(k, expected): v for k, v in state["vae"].items()}, _VAE_EXTRAS)
    return model.eval()


# -----------------------------------------------------------------------------
# Sampling


def sample_bits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One bit per (position, bit) from logits (..., 2) with Infinity's filters: top-k (a no-op for k >= 2,
    as in the release), then drop the least likely values whose cumulative mass is <= 1 - top_p."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1).reshape(-1, logits.shape[-1])
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])


def _per_scale(value, n: int, name: str) -> list[float]:
    values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * n
    if len(values) < n:
        raise ValueError(f"{name}: {len(values)} values for {n} scales")
    return values


# -----------------------------------------------------------------------------
# Student


class InfinityStudent(T5Student):
    """Infinity + BSQ-VAE + frozen T5 encoder behind `ARStudent`. Image tokens are bits, shaped (B, N, d) with
    N the positions of the whole pyramid; logits are (B, N, d, 2). Only `infinity` is meant to be trained."""

    def __init__(self, infinity: Infinity, vae: BSQVAE, text_encoder: nn.Module, tokenizer, image_size: int):
        super().__init__()
        if image_size % vae.config.patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of the VAE stride {vae.config.patch_size}")
        schedule = scale_schedule(image_size // vae.config.patch_size)
        if infinity.schedule != schedule:
            raise ValueError(f"Infinity built for scales {infinity.schedule}, image_size {image_size} needs {schedule}")
        if infinity.config.d_vae != vae.config.codebook_dim:
            raise ValueError(f"Infinity reads {infinity.config.d_vae} bits, VAE makes {vae.config.codebook_dim}")
        self.infinity, self.vae, self.image_size, self.schedule = infinity, vae, image_size, schedule
        self.attach_text_encoder(text_encoder, tokenizer, infinity.config.text_channels)
        self.freeze("vae", "text_encoder")

    @classmethod  # the signature `T5Student.from_params` calls, as every T5 family's
    def from_paths(cls, checkpoint: str | os.PathLike, vq_checkpoint: str | os.PathLike,
                   text_encoder: str | os.PathLike, size: str = "tiny", vq_size: str = "tiny",
                   image_size: int = 64) -> InfinityStudent:
        """Load released-format weights (vq_checkpoint: the BSQ-VAE); text_encoder is a local `save_pretrained`
        folder (model + tokenizer)."""
        config, vae_config = pick(INFINITY_SIZES, size, "Infinity"), pick(VAE_SIZES, vq_size, "BSQ-VAE")
        if image_size % vae_config.patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of the VAE stride {vae_config.patch_size}")
        schedule = scale_schedule(image_size // vae_config.patch_size)
        encoder, tokenizer = cls.load_text_encoder(text_encoder)
        return cls(load_infinity_checkpoint(checkpoint, config, schedule), load_vae_checkpoint(vq_checkpoint, vae_config),
                   encoder, tokenizer, image_size)

    @property
    def device(self) -> torch.device:
        return self.infinity.pos_start.device

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> bit tokens (B, N, d) in {0, 1}, scale by scale, each scale row-major."""
        return self.vae.encode(images.to(self.device), self.schedule)

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(tokens.to(self.device), self.schedule)

    def encode_prompts(self, prompts: list[str]) -> PromptBatch:
        """T5 features of the valid tokens (EOS included), right-padded to the longest prompt and truncated at
        text_maxlen; padded slots are zero and masked out (Infinity packs the valid tokens the same way)."""
        batch = self.tokenizer(prompts, max_length=self.infinity.config.text_maxlen, padding="longest",
                               truncation=True, return_tensors="pt").to(self.text_encoder.device)
        feats = self.text_encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        mask = batch.attention_mask.bool()
        return PromptBatch((feats.float() * mask[..., None]).to(self.device), mask.to(self.device), "right")

    def _uncond(self, mask: torch.Tensor) -> torch.Tensor:
        """Unconditional caption for these masks: `cfg_uncond`'s first rows in each row's valid slots."""
        n = int(mask.sum(1).max())
        if n > self.infinity.config.text_maxlen:
            raise ValueError(f"condition has {n} tokens; Infinity's unconditional caption has "
                             f"{self.infinity.config.text_maxlen}")
        idx = (mask.long().cumsum(1) - 1).clamp(min=0)
        return self.infinity.cfg_uncond[idx] * mask[..., None]

    def logits(self, cond: PromptBatch, tokens: torch.Tensor, cond_dropout: float = 0.0) -> torch.Tensor:
        """Teacher-forced bit logits (B, N, d, 2): each scale reads the area-resized sum of the earlier scales'
        codes (Infinity's training inputs). Dropped rows get the unconditional caption (CFG training)."""
        text = cond.features.to(self.device, self.infinity.cfg_uncond.dtype)
        mask = cond.mask.to(self.device)
        if cond_dropout > 0:
            drop = torch.rand(text.shape[0], device=text.device) < cond_dropout
            text = torch.where(drop[:, None, None], self._uncond(mask), text)
        maps = self.vae.bits_to_maps(tokens.to(self.device), self.schedule)[:-1]
        return self.infinity(self.infinity.context(text, mask), next_scale_inputs(maps, self.schedule, "area"))

    def loss(self, cond: PromptBatch, tokens: torch.Tensor, cond_dropout: float = 0.0,
             token_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Bitwise cross-entropy averaged per token (mean over its d bits), weighted per token: (N,) or (B, N)
        weights get a trailing bit axis so they broadcast over (B, N, d)."""
        weights = None if token_weights is None else token_weights[..., None]
        return weighted_cross_entropy(self.logits(cond, tokens, cond_dropout), tokens.to(self.device), weights)

    def scale_token_weights(self, early_scales: int = 8, early: float = 1.0, late: float = 0.5) -> torch.Tensor:
        """ARBooth's scale-wise loss weights (N,): `early` on the positions of the first `early_scales` scales,
        `late` on the rest."""
        return torch.cat([torch.full((s * s,), early if i < early_scales else late)
                          for i, s in enumerate(self.schedule)])

    @torch.no_grad()
    def sample_tokens(self, cond: PromptBatch, cfg_scale: float | list[float] = 4.0,
                      temperature: float | list[float] = 0.5, top_k: int = 900, top_p: float = 0.97, seed: int = 0,
                      use_cache: bool = True, autocast: bool = False) -> torch.Tensor:
        """Bit tokens (B, N, d), one scale per step. `cfg_scale` and `temperature` (Infinity's tau) may be
        per-scale lists. Conditional and unconditional rows share one forward per scale; guidance is
        cfg * cond + (1 - cfg) * uncond on the tau-scaled logits (the release's cfg_insertion_layer=0).
        Defaults are the release's (scripts/infer.sh, tools/run_infinity.py)."""
        S = len(self.schedule)
        cfgs, taus = _per_scale(cfg_scale, S, "cfg_scale"), _per_scale(temperature, S, "temperature")
        text = cond.features.to(self.device, self.infinity.cfg_uncond.dtype)
        mask = cond.mask.to(self.device)
        B = text.shape[0]
        guided = any(c != 1.0 for c in cfgs)
        if guided:
            text, mask = torch.cat([text, self._uncond(mask)]), torch.cat([mask, mask])
        generator = torch.Generator(self.device).manual_seed(seed)
        caches = self.infinity.new_caches() if use_cache else None
        offsets, grid, inputs, bits, summed = self.infinity.offsets, self.schedule[-1], [], [], 0.0
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            ctx = self.infinity.context(text, mask)
            for si, s in enumerate(self.schedule):
                if use_cache:
                    logits = self.infinity(ctx, inputs[-1] if si else None, offsets[si], caches)
                else:
                    logits = self.infinity(ctx, torch.cat(inputs, 1) if si else None)[:, offsets[si]:]
                logits = logits / taus[si]
                if guided and cfgs[si] != 1.0:
                    logits = cfgs[si] * logits[:B] + (1 - cfgs[si]) * logits[B:]
                b = sample_bits(logits[:B], top_k, top_p, generator)
                bits.append(b)
                if si + 1 < S:  # the release's inference inputs: bilinear both ways
                    summed = summed + _resize(self.vae.bits_to_maps(b, (s,))[0], grid, "bilinear")
                    nxt = _resize(summed, self.schedule[si + 1], "bilinear").flatten(2).transpose(1, 2)
                    inputs.append(nxt.repeat(2 if guided else 1, 1, 1))
        return torch.cat(bits, dim=1)

    def parameter_groups(self) -> dict[str, list[str]]:
        """Groups of `self.named_parameters()` names (transformer plus the T5 token table); matches peft-wrapped
        names too. Standalone q/v biases form their own group so every other group maps onto Linear modules."""
        rules = {  # group -> regex over this family's parameter names
            "text_embedding": r"(^|\.)text_encoder\.shared\.",
            "text_proj": r"\.(text_proj_for_sos|text_proj_for_ca|cfg_uncond)",
            "embeddings": r"\.(word_embed|lvl_embed|pos_start)",
            "adaln": r"\.(ada_gss|shared_ada_lin\.|head_nm\.)",
            "attn_qkv": r"\.sa\.mat_qkv\.",
            "attn_out": r"\.sa\.proj\.",
            "cross_attn": r"\.module\.\d+\.ca\.(mat_q|mat_kv|proj)\.",
            "attn_bias": r"\.(sa\.q_bias|sa\.v_bias|module\.\d+\.ca\.v_bias)$",
            "mlp": r"\.ffn\.",
            "norms": r"\.(ca_norm|text_norm)\.",
            "output": r"\.head\.",
        }
        groups = self.group_parameters(rules, skip=r"^(vae|text_encoder)\.(?!shared\.)")
        per_chunk = self.infinity.config.depth // self.infinity.config.block_chunks
        for full, _ in self.named_parameters():  # layer i is block_chunks.<i // per_chunk>.module.<i % per_chunk>
            if m := re.search(r"\.block_chunks\.(\d+)\.module\.(\d+)\.", full):
                layer = int(m.group(1)) * per_chunk + int(m.group(2))
                groups.setdefault(f"layer.{layer}", []).append(full)
        return groups

    def lora_target_modules(self) -> list[str]:
        return ["mat_qkv", "sa.proj", "mat_q", "mat_kv", "ca.proj", "fc1", "fc2"]

    def enable_gradient_checkpointing(self) -> None:
        self.infinity.gradient_checkpointing = True

"""VAR class-conditional student (Tian et al. 2024, "Visual Autoregressive Modeling: Scalable Image Generation via
Next-Scale Prediction").

A multi-scale residual VQVAE turns an image into K code maps of growing size (1x1 ... 16x16 at 256²); the
transformer predicts each whole map at once from the upsampled sum of the earlier ones, attending block-causally
across scales, with adaptive layer norm on the class embedding. Module and buffer names match the released
`var_d*.pth` (a plain state dict) and `vae_ch160v4096z32.pth` key for key, so official weights load with no
renaming and weights saved from these modules load with the official code too.

Personalisation: VAR has no text encoder. A word-level tokenizer maps class names to rows of `class_emb`
(num_classes + 1 rows, the last one unconditional; unknown words map to it). Identifier tokens grow the table
(`add_identifier_tokens`), so Sun et al.'s new-token learning is "learn a new class embedding".
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ar_models.base import ARStudent, PromptBatch
from ar_models.loading import load_strict, pick
from ar_models.sampling import ScaleKVCache, sample_logits
from ar_models.vq_blocks import Encoder, Level, Mid, group_norm

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
PATCH_NUMS_WORLD = (1, 2, 3, 4, 6, 8)  # 32², with the world VQVAE's 4x downsampling

# -----------------------------------------------------------------------------
# Transformer


@dataclass(frozen=True)
class VARConfig:
    depth: int = 16
    embed_dim: int = 1024  # VAR: depth * 64
    num_heads: int = 16  # VAR: depth
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # class_emb has one more row: the unconditional class
    norm_eps: float = 1e-6
    shared_aln: bool = False  # d36-s shares one AdaLN projection across blocks
    attn_l2_norm: bool = True  # cosine attention with a learned per-head temperature
    patch_nums: tuple[int, ...] = PATCH_NUMS_256

    @property
    def tokens(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)


VAR_SIZES: dict[str, VARConfig] = {
    "tiny": VARConfig(depth=2, embed_dim=64, num_heads=4, patch_nums=(1, 2, 3, 4)),
    # Pretrained on the miniature world (testbed.world_pretrain): 32 px images, six scales up to the 8x8 codes.
    "world": VARConfig(depth=4, embed_dim=128, num_heads=4, patch_nums=PATCH_NUMS_WORLD),
    "d16": VARConfig(depth=16, embed_dim=1024, num_heads=16),  # 310M
    "d20": VARConfig(depth=20, embed_dim=1280, num_heads=20),  # 600M
    "d24": VARConfig(depth=24, embed_dim=1536, num_heads=24),  # 1.0B
    "d30": VARConfig(depth=30, embed_dim=1920, num_heads=30),  # 2.0B
    "d36": VARConfig(depth=36, embed_dim=2304, num_heads=36, shared_aln=True, patch_nums=PATCH_NUMS_512),  # 2.3B, 512²
}


class SelfAttention(nn.Module):
    """Q/K/V with Q and V biases only (K's is a zero buffer); with `attn_l2_norm`, cosine attention scaled by a
    learned per-head temperature (clamped at 100), else 0.25/sqrt(head_dim) as in VAR."""

    def __init__(self, config: VARConfig):
        super().__init__()
        C, H = config.embed_dim, config.num_heads
        self.num_heads, self.head_dim = H, C // H
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(C)), nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.attn_l2_norm = config.attn_l2_norm
        if self.attn_l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), 4.0).log())
        self.proj = nn.Linear(C, C)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None, cache: ScaleKVCache | None) -> torch.Tensor:
        B, L, C = x.shape
        # the module call (not F.linear on .weight) keeps LoRA-wrapped mat_qkv working
        qkv = self.mat_qkv(x) + torch.cat([self.q_bias, self.zero_k_bias, self.v_bias]).to(x.dtype)
        q, k, v = qkv.view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, hd)
        scale = 0.25 / math.sqrt(self.head_dim)
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(math.log(100)).exp().to(q.dtype)
            k, scale = F.normalize(k, dim=-1), 1.0
        if cache is not None:
            k, v = cache.update(k, v)
        mask = None if attn_bias is None else attn_bias.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, config: VARConfig):
        super().__init__()
        hidden = round(config.embed_dim * config.mlp_ratio)
        self.fc1 = nn.Linear(config.embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNSelfAttn(nn.Module):
    """Pre-norm block whose norms' scale/shift and the residual gates come from the class condition: its own
    `ada_lin` (SiLU + Linear), or with shared AdaLN a learned per-block offset `ada_gss` on the shared output."""

    def __init__(self, config: VARConfig):
        super().__init__()
        C = config.embed_dim
        self.attn = SelfAttention(config)
        self.ffn = FFN(config)
        self.ln_wo_grad = nn.LayerNorm(C, eps=config.norm_eps, elementwise_affine=False)
        self.shared_aln = config.shared_aln
        if self.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def forward(self, x, cond, attn_bias, cache):
        """cond: (B, 1, 6, C) from the shared projection, or the class condition (B, D)."""
        ada = self.ada_gss + cond if self.shared_aln else self.ada_lin(cond).view(-1, 1, 6, x.shape[-1])
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.unbind(2)
        x = x + self.attn(self.ln_wo_grad(x) * (scale1 + 1) + shift1, attn_bias, cache) * gamma1
        return x + self.ffn(self.ln_wo_grad(x) * (scale2 + 1) + shift2) * gamma2


class AdaLNBeforeHead(nn.Module):
    def __init__(self, config: VARConfig):
        super().__init__()
        C = config.embed_dim
        self.ln_wo_grad = nn.LayerNorm(C, eps=config.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, x.shape[-1]).unbind(2)
        return self.ln_wo_grad(x) * (scale + 1) + shift


class SharedAdaLin(nn.Linear):
    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return super().forward(cond).view(-1, 1, 6, self.weight.shape[0] // 6)


class VAR(nn.Module):
    """VAR's transformer. The sequence is every scale's tokens in order; the first scale's inputs are the class
    condition (`sos`) plus `pos_start`, later scales read `word_embed` of the VQVAE-space inputs."""

    def __init__(self, config: VARConfig, vae_channels: int, vocab_size: int):
        super().__init__()
        self.config = config
        C, L = config.embed_dim, config.tokens
        self.first_l = config.patch_nums[0] ** 2
        init_std = math.sqrt(1 / C / 3)
        self.word_embed = nn.Linear(vae_channels, C)
        self.class_emb = nn.Embedding(config.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))
        self.lvl_embed = nn.Embedding(len(config.patch_nums), C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C)) if config.shared_aln else nn.Identity()
        self.blocks = nn.ModuleList(AdaLNSelfAttn(config) for _ in range(config.depth))
        # level ids and the block-causal mask (a scale sees itself and every earlier scale); saved in the releases
        lvl = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(config.patch_nums)])
        self.register_buffer("lvl_1L", lvl[None])
        bias = torch.where(lvl[:, None] >= lvl[None, :], 0.0, -torch.inf)
        self.register_buffer("attn_bias_for_masking", bias.reshape(1, 1, L, L))
        self.head_nm = AdaLNBeforeHead(config)
        self.head = nn.Linear(C, vocab_size)
        self.gradient_checkpointing = False
        self._init_weights(init_std)

    def _init_weights(self, std: float) -> None:
        """VAR's truncated normals of std sqrt(1/3C) and zero biases; unlike VAR the head and AdaLN gates are not
        shrunk, so a random replica's outputs depend on class and scale."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)

    def new_caches(self) -> list[ScaleKVCache]:
        return [ScaleKVCache() for _ in self.blocks]

    def embed(self, cond: torch.Tensor, x_BLCv: torch.Tensor, start: int) -> torch.Tensor:
        """Transformer inputs for positions start..: the first scale's `sos` tokens (when start is 0), then
        `word_embed` of the VQVAE-space inputs (B, l, Cvae); plus level and position embeddings."""
        parts = []
        if start == 0:
            B = cond.shape[0]
            parts.append(cond[:, None].expand(B, self.first_l, -1) + self.pos_start.expand(B, -1, -1))
        if x_BLCv.shape[1]:
            parts.append(self.word_embed(x_BLCv.float()))
        h = torch.cat(parts, dim=1)
        end = start + h.shape[1]
        return h + self.lvl_embed(self.lvl_1L[:, start:end]) + self.pos_1LC[:, start:end]

    def forward(self, cond: torch.Tensor, x_BLCv: torch.Tensor, start: int = 0,
                caches: list[ScaleKVCache] | None = None) -> torch.Tensor:
        """fp32 logits (B, l, V) for positions start..start+l. cond (B, D) is the class condition. Without caches
        pass every position from 0 (block-causal mask); with caches only the next scale's (no mask needed)."""
        h = self.embed(cond, x_BLCv, start)
        end = start + h.shape[1]
        if caches is None and start:
            raise ValueError("without caches the whole sequence must be passed from position 0")
        attn_bias = None if caches is not None else self.attn_bias_for_masking[:, :, :end, :end]
        ada = self.shared_ada_lin(cond)
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and caches is None and torch.is_grad_enabled():
                h = checkpoint(block, h, ada, attn_bias, None, use_reentrant=False)
            else:
                h = block(h, ada, attn_bias, None if caches is None else caches[i])
        return self.head(self.head_nm(h.float(), cond.float())).float()


# -----------------------------------------------------------------------------
# Multi-scale VQVAE


@dataclass(frozen=True)
class VQVAEConfig:
    vocab_size: int = 4096
    z_channels: int = 32  # Cvae
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # VAR's (16x downsampling); the world VQVAE is shallower
    num_res_blocks: int = 2
    quant_conv_ks: int = 3
    quant_resi: float = 0.5  # phi(h) = (1 - r) h + r conv(h)
    share_quant_resi: int = 4  # phi convolutions shared across the scales (partially shared, as released)
    using_znorm: bool = False  # cosine instead of l2 nearest-code lookup

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


VQ_SIZES: dict[str, VQVAEConfig] = {
    "tiny": VQVAEConfig(vocab_size=256, z_channels=8, ch=32),
    "ch160v4096z32": VQVAEConfig(),  # vae_ch160v4096z32.pth
    # The miniature world's tokenizer: 4x downsampling, so a 32 px image's last scale is 8x8 codes of 512, as
    # LlamaGen's world VQ.
    "world": VQVAEConfig(vocab_size=512, z_channels=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1),
}


class AttnBlock(nn.Module):  # own copy of vq_blocks.AttnBlock: VAR's release fuses Q/K/V into one `qkv` conv
    """Single-head self-attention over pixels, one 1x1 conv for Q/K/V."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)  # (B, HW, C)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(y)


class Decoder(nn.Module):
    """Own copy of vq_blocks.Decoder (same modules, same math): it builds up[0] first where taming builds the
    deepest level first, and a seed's random init depends on that order."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        mult, n = config.ch_mult, len(config.ch_mult)
        top = config.ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, top, 3, padding=1)
        self.mid = Mid(top, AttnBlock)
        # up[i] works at resolution i (0 = full size) and runs from i = n-1 down to 0, as in VAR's Decoder
        ins = [config.ch * mult[i + 1] if i < n - 1 else top for i in range(n)]
        self.up = nn.ModuleList(
            Level(ins[i], config.ch * mult[i], config.num_res_blocks + 1, AttnBlock if i == n - 1 else None,
                  resample="up" if i > 0 else None)
            for i in range(n)
        )
        self.norm_out = group_norm(config.ch * mult[0])
        self.conv_out = nn.Conv2d(config.ch * mult[0], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """VAR's residual refinement after upsampling a scale's codes: (1 - r) h + r conv3x3(h)."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class PhiPartiallyShared(nn.Module):
    """K phi convs shared by the scales: scale si uses the one whose tick is nearest si / (S - 1)."""

    def __init__(self, channels: int, ratio: float, count: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, ratio) for _ in range(count))
        lo = 1 / 3 / count if count == 4 else 1 / 2 / count
        self.ticks = torch.linspace(lo, 1 - lo, count, dtype=torch.float64).tolist()

    def at(self, si: int, n_scales: int) -> Phi:
        where = si / (n_scales - 1)
        return self.qresi_ls[min(range(len(self.ticks)), key=lambda i: abs(self.ticks[i] - where))]


class MultiScaleQuantizer(nn.Module):
    """Residual quantisation over scales: each scale quantises the area-downsampled residual, and its codes,
    bicubic-upsampled and refined by phi, are subtracted from the residual and added to f_hat."""

    def __init__(self, config: VQVAEConfig, patch_nums: tuple[int, ...]):
        super().__init__()
        if len(patch_nums) < 2:
            raise ValueError(f"patch_nums {patch_nums}: VAR needs at least two scales")
        self.patch_nums, self.using_znorm = tuple(patch_nums), config.using_znorm
        self.Cvae = config.z_channels
        self.quant_resi = PhiPartiallyShared(config.z_channels, config.quant_resi, config.share_quant_resi)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(patch_nums), config.vocab_size))  # training stat
        self.embedding = nn.Embedding(config.vocab_size, config.z_channels)

    @property
    def lengths(self) -> list[int]:
        return [pn * pn for pn in self.patch_nums]

    def nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        table = self.embedding.weight
        if self.using_znorm:
            return (F.normalize(z_NC, dim=-1) @ F.normalize(table, dim=-1).T).argmax(1)
        dist = z_NC.square().sum(1, keepdim=True) + table.square().sum(1) - 2 * z_NC @ table.T
        return dist.argmin(1)

    def contribution(self, si: int, idx: torch.Tensor) -> torch.Tensor:
        """Scale si's codes idx (B, pn²) as a term of f_hat: upsampled to the last scale, refined by phi."""
        B, pn, H = idx.shape[0], self.patch_nums[si], self.patch_nums[-1]
        h = self.embedding(idx).transpose(1, 2).reshape(B, self.Cvae, pn, pn)
        if si != len(self.patch_nums) - 1:
            h = F.interpolate(h, size=(H, H), mode="bicubic")
        return self.quant_resi.at(si, len(self.patch_nums))(h)

    def zeros(self, B: int, ref: torch.Tensor) -> torch.Tensor:
        H = self.patch_nums[-1]
        return torch.zeros(B, self.Cvae, H, H, device=ref.device, dtype=torch.float32)

    def next_input(self, f_hat: torch.Tensor, si: int) -> torch.Tensor:
        """The transformer's input for scale si + 1: f_hat area-downsampled to its size, (B, pn², Cvae)."""
        pn = self.patch_nums[si + 1]
        return F.interpolate(f_hat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)

    def encode(self, f: torch.Tensor) -> list[torch.Tensor]:
        """Features (B, Cvae, H, H) -> per-scale codes [(B, pn²)], smallest scale first."""
        B, C, H, W = f.shape
        if (H, W) != (self.patch_nums[-1],) * 2:
            raise ValueError(f"feature map {H}x{W} does not match the last scale {self.patch_nums[-1]}")
        f_rest, f_hat, out = f.float(), self.zeros(B, f), []
        for si, pn in enumerate(self.patch_nums):
            z = f_rest if si == len(self.patch_nums) - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")
            idx = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn * pn)
            h = self.contribution(si, idx)
            f_rest, f_hat = f_rest - h, f_hat + h
            out.append(idx)
        return out

    def to_var_input(self, scales: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing inputs (B, sum of pn² for scales 1..k, Cvae) from the codes of scales 0..k-1: VAR's
        `idxBl_to_var_input` (the full list gives every input but the first scale's)."""
        B = scales[0].shape[0]
        f_hat, out = self.zeros(B, scales[0]), []
        for si, idx in enumerate(scales[: len(self.patch_nums) - 1]):
            f_hat = f_hat + self.contribution(si, idx)
            out.append(self.next_input(f_hat, si))
        return torch.cat(out, dim=1) if out else f_hat.new_zeros(B, 0, self.Cvae)

    def to_fhat(self, scales: list[torch.Tensor]) -> torch.Tensor:
        f_hat = self.zeros(scales[0].shape[0], scales[0])
        for si, idx in enumerate(scales):
            f_hat = f_hat + self.contribution(si, idx)
        return f_hat


class VQVAE(nn.Module):
    def __init__(self, config: VQVAEConfig, patch_nums: tuple[int, ...]):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, attn_levels=(len(config.ch_mult) - 1,), attn=AttnBlock)  # the deepest level
        self.decoder = Decoder(config)
        self.quantize = MultiScaleQuantizer(config, patch_nums)
        ks = config.quant_conv_ks
        self.quant_conv = nn.Conv2d(config.z_channels, config.z_channels, ks, padding=ks // 2)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, ks, padding=ks // 2)

    def split(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        return list(tokens.split(self.quantize.lengths, dim=1))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> codes (B, N), every scale flattened row-major, smallest first."""
        return torch.cat(self.quantize.encode(self.quant_conv(self.encoder(images))), dim=1)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fhat_to_img(self.quantize.to_fhat(self.split(tokens)))


# -----------------------------------------------------------------------------
# Checkpoints

# The quantizer's per-scale usage statistics: VAR itself replaces them when the scale count differs.
_FLEXIBLE = {"quantize.ema_vocab_hit_SV"}


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """VAR's release format: a plain state dict."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict (name -> tensor)")
    return state


def load_var_checkpoint(path: str | os.PathLike, config: VARConfig, vae: VQVAEConfig) -> VAR:
    model = VAR(config, vae.z_channels, vae.vocab_size)
    load_strict(model, path, _read_state_dict(path))
    return model.eval()


def load_vae_checkpoint(path: str | os.PathLike, config: VQVAEConfig, patch_nums: tuple[int, ...]) -> VQVAE:
    model = VQVAE(config, patch_nums)
    load_strict(model, path, _read_state_dict(path), flexible=_FLEXIBLE)
    return model.eval()


# -----------------------------------------------------------------------------
# Class tokenizer


def class_tokenizer(class_names: list[str]):
    """A word-level tokenizer whose ids are class_emb rows: class i -> i, anything unknown -> num_classes (the
    unconditional row). Identifier tokens added later get the following ids, i.e. new class_emb rows."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = [n.lower() for n in class_names]
    bad = [n for n in names if not n or any(c.isspace() for c in n)]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"class names must be distinct single words, got {(bad or names)[:3]}")
    vocab = {n: i for i, n in enumerate(names)} | {"<unk>": len(names)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


# -----------------------------------------------------------------------------
# Student


class VARStudent(ARStudent):
    """VAR + multi-scale VQVAE + class tokenizer behind `ARStudent`. Only `var` is meant to be trained.

    Tokens are every scale's codes, smallest scale first (N = sum of pn²). A prompt's condition is the mean
    class_emb row of its identifier tokens (tokens added with `add_identifier_tokens`) when it has any, else of
    its class-name words, else the unconditional row: `encode_prompts` gives one (B, 1, D) vector, right-padded.
    The transformer reads the *sum* of a condition's valid vectors, so ARBooth's zero-initialised prefix vectors
    (`insert_prefix` appends them) start as a no-op and learn an offset of the class embedding."""

    def __init__(self, var: VAR, vae: VQVAE, tokenizer, image_size: int):
        super().__init__()
        pn = var.config.patch_nums
        if tuple(vae.quantize.patch_nums) != tuple(pn):
            raise ValueError(f"VAR patch_nums {pn} != VQVAE patch_nums {vae.quantize.patch_nums}")
        if pn[-1] * vae.config.downsample != image_size:
            raise ValueError(f"image_size {image_size}: the last scale {pn[-1]} x VQVAE downsampling "
                             f"{vae.config.downsample} gives {pn[-1] * vae.config.downsample}; set student.patch_nums")
        if var.head.out_features != vae.config.vocab_size:
            raise ValueError(f"VAR vocab {var.head.out_features} != VQVAE codebook {vae.config.vocab_size}")
        if tokenizer.unk_token_id != var.config.num_classes:
            raise ValueError(f"tokenizer's unknown-word id {tokenizer.unk_token_id} must be the unconditional class "
                             f"{var.config.num_classes}")
        self.var, self.vae, self.tokenizer, self.image_size = var, vae, tokenizer, image_size
        self.uncond_id = var.config.num_classes
        self.freeze("vae")

    @classmethod
    def from_paths(cls, checkpoint: str | os.PathLike, vq_checkpoint: str | os.PathLike, tokenizer: str | os.PathLike,
                   size: str = "tiny", vq_size: str = "tiny", image_size: int = 64,
                   patch_nums: tuple[int, ...] | list[int] | None = None) -> VARStudent:
        """Load released-format weights; `tokenizer` is a class tokenizer folder (`class_tokenizer` saved) whose
        class count must match the checkpoint's class_emb."""
        from transformers import PreTrainedTokenizerFast

        config, vq_config = pick(VAR_SIZES, size, "VAR"), pick(VQ_SIZES, vq_size, "VQVAE")
        tok = PreTrainedTokenizerFast.from_pretrained(str(tokenizer), local_files_only=True)
        if tok.unk_token_id is None:
            raise ValueError(f"{tokenizer}: not a class tokenizer (no unknown-word token for the unconditional class)")
        config = replace(config, num_classes=tok.unk_token_id,
                         patch_nums=tuple(int(p) for p in patch_nums) if patch_nums else config.patch_nums)
        var = load_var_checkpoint(checkpoint, config, vq_config)
        vae = load_vae_checkpoint(vq_checkpoint, vq_config, config.patch_nums)
        return cls(var, vae, tok, image_size)

    @classmethod
    def from_params(cls, student: dict) -> VARStudent:
        """`student` keys: checkpoint, vq_checkpoint (files), tokenizer (folder), size, vq_size, image_size, and
        optionally patch_nums (when image_size differs from the size's own)."""
        from ar_models import require_file

        return cls.from_paths(
            checkpoint=require_file(student, "checkpoint"), vq_checkpoint=require_file(student, "vq_checkpoint"),
            tokenizer=require_file(student, "tokenizer", folder=True), size=student["size"],
            vq_size=student["vq_size"], image_size=int(student["image_size"]), patch_nums=student.get("patch_nums"),
        )

    @property
    def device(self) -> torch.device:
        return self.var.word_embed.weight.device

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.var.config.patch_nums

    @property
    def text_embedding(self) -> nn.Embedding:
        return self.var.class_emb

    def set_text_embedding(self, embedding: nn.Embedding) -> None:
        self.var.class_emb = embedding

    def scale_token_weights(self, early_scales: int = 8, early: float = 1.0, late: float = 0.5) -> torch.Tensor:
        """ARBooth's scale-wise loss weights (N,): `early` on the tokens of the first `early_scales` scales,
        `late` on the rest."""
        per_scale = [early if si < early_scales else late for si in range(len(self.patch_nums))]
        return torch.tensor([w for w, pn in zip(per_scale, self.patch_nums) for _ in range(pn * pn)],
                            device=self.device)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images.to(self.device))

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(tokens.to(self.device))

    def class_ids(self, prompt: str) -> list[int]:
        """The class_emb rows a prompt's condition averages (see the class docstring)."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        added = [i for i in ids if i > self.uncond_id]
        return added or [i for i in ids if i < self.uncond_id] or [self.uncond_id]

    def encode_prompts(self, prompts: list[str]) -> PromptBatch:
        table = self.text_embedding
        vectors = torch.stack([table(torch.tensor(self.class_ids(p), device=table.weight.device)).mean(0)
                               for p in prompts])
        mask = torch.ones(len(prompts), 1, dtype=torch.bool, device=self.device)
        return PromptBatch(features=vectors[:, None].to(self.device), mask=mask, padding_side="right")

    def condition(self, cond: PromptBatch) -> torch.Tensor:
        """(B, D): the sum of a PromptBatch's valid vectors (class vector plus any prefix vectors)."""
        feats = cond.features.to(self.device, self.var.class_emb.weight.dtype)
        return (feats * cond.mask.to(self.device)[..., None]).sum(1)

    def logits(self, cond: PromptBatch, tokens: torch.Tensor, cond_dropout: float = 0.0) -> torch.Tensor:
        """Teacher-forced logits (B, N, V); scale k's inputs are the area-downsampled sum of the earlier scales'
        upsampled codes (VAR's `idxBl_to_var_input`). Dropped rows get the unconditional class embedding."""
        cond_BD = self.condition(cond)
        if cond_dropout > 0:
            drop = torch.rand(cond_BD.shape[0], device=cond_BD.device) < cond_dropout
            cond_BD = torch.where(drop[:, None], self.var.class_emb.weight[self.uncond_id], cond_BD)
        tokens = tokens.to(self.device)
        with torch.no_grad():
            x = self.vae.quantize.to_var_input(self.vae.split(tokens))
        return self.var(cond_BD, x)

    @torch.no_grad()
    def sample_tokens(self, cond: PromptBatch, cfg_scale: float = 4.0, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, seed: int = 0, use_cache: bool = True,
                      autocast: bool = False) -> torch.Tensor:
        """Codes (B, N), one scale per step. VAR's guidance ramps with the scale: at scale si of S the logits are
        (1 + t) cond - t uncond with t = (cfg_scale - 1) * si / (S - 1), i.e. VAR's `cfg` is cfg_scale - 1 (its
        cfg=1.5 is cfg_scale=2.5) and cfg_scale=1 is unguided. Conditional and unconditional rows share one
        batched forward per scale; with the cache each scale feeds only its own tokens."""
        cond_BD = self.condition(cond)
        B, S, quant = cond_BD.shape[0], len(self.patch_nums), self.vae.quantize
        guided = cfg_scale != 1.0
        if guided:
            cond_BD = torch.cat([cond_BD, self.var.class_emb.weight[self.uncond_id].expand(B, -1)])
        rows = cond_BD.shape[0] // B
        generator = torch.Generator(self.device).manual_seed(seed)
        caches = self.var.new_caches() if use_cache else None
        scales: list[torch.Tensor] = []
        f_hat, x_next, start = quant.zeros(B, cond_BD), cond_BD.new_zeros(B, 0, quant.Cvae), 0
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            for si, pn in enumerate(self.patch_nums):
                if use_cache:
                    logits = self.var(cond_BD, x_next.repeat(rows, 1, 1), start, caches)
                else:
                    x = quant.to_var_input(scales) if scales else x_next
                    logits = self.var(cond_BD, x.repeat(rows, 1, 1))[:, start:]
                if guided:
                    t = (cfg_scale - 1) * si / (S - 1)
                    c, u = logits.chunk(2)
                    logits = (1 + t) * c - t * u
                V = logits.shape[-1]
                idx = sample_logits(logits.reshape(-1, V), temperature, top_k, top_p, generator).view(B, pn * pn)
                scales.append(idx)
                start += pn * pn
                if si < S - 1 and use_cache:
                    f_hat = f_hat + quant.contribution(si, idx)
                    x_next = quant.next_input(f_hat, si)
        return torch.cat(scales, dim=1)

    def parameter_groups(self) -> dict[str, list[str]]:
        """Groups of `self.named_parameters()` names (the VAR transformer's); matches peft-wrapped names too.
        'norms' are the AdaLN projections (VAR's layer norms have no weights)."""
        rules = {  # group -> regex over this family's parameter names
            "text_embedding": r"^var\.class_emb\.",
            "word_embed": r"^var\.word_embed\.",
            "positions": r"^var\.(pos_start|pos_1LC|lvl_embed\.)",
            "attn_qkv": r"\.attn\.mat_qkv\.",
            "attn_bias": r"\.attn\.(q_bias|v_bias|scale_mul_1H11)$",  # Q/V biases and the cosine temperature
            "attn_out": r"\.attn\.proj\.",
            "mlp": r"\.ffn\.",
            "norms": r"(ada_lin|ada_gss)",
            "output": r"^var\.head\.",
        }
        # no cross-attention: the class conditions through AdaLN and the first scale
        return self.group_parameters(rules, layer=r"^var\.blocks\.(\d+)\.", skip=r"^(?!var\.)")

    def lora_target_modules(self) -> list[str]:
        return ["mat_qkv", "proj", "fc1", "fc2"]

    def enable_gradient_checkpointing(self) -> None:
        self.var.gradient_checkpointing = True

"""LlamaGen text-to-image student (Sun et al. 2024, "Autoregressive Model Beats Diffusion").

A Llama-style decoder reads a prefix of projected T5 caption features and predicts VQ image codes in
raster order. Module and buffer names match the released LlamaGen t2i / VQ checkpoints key for key, so
official weights load with no renaming, and weights saved from these modules load with the official code too.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ar_models.base import PromptBatch, T5Student
from ar_models.loading import load_strict, pick
from ar_models.sampling import bf16_weight_cache, sample_guided
from ar_models.vq_blocks import AttnBlock, Downsample, ResnetBlock, Upsample, VQAutoencoder, group_norm

# -----------------------------------------------------------------------------
# GPT


@dataclass(frozen=True)
class GPTConfig:
    dim: int = 1280
    n_layer: int = 36
    n_head: int = 20
    vocab_size: int = 16384  # = VQ codebook size
    caption_dim: int = 2048  # text-encoder width (flan-t5-xl)
    cls_token_num: int = 120  # caption prefix length
    block_size: int = 256  # image tokens = grid_size ** 2
    multiple_of: int = 256  # SwiGLU hidden width is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02


GPT_SIZES: dict[str, GPTConfig] = {
    "tiny": GPTConfig(dim=64, n_layer=2, n_head=4, vocab_size=512, caption_dim=32, cls_token_num=16),
    # Pretrained on the miniature world (testbed.world_pretrain): room for its longest captions.
    "world": GPTConfig(dim=128, n_layer=4, n_head=4, vocab_size=512, caption_dim=32, cls_token_num=24),
    "B": GPTConfig(dim=768, n_layer=12, n_head=12),  # 111M
    "L": GPTConfig(dim=1024, n_layer=24, n_head=16),  # 343M
    "XL": GPTConfig(dim=1280, n_layer=36, n_head=20),  # 775M, the released t2i model
    "XXL": GPTConfig(dim=1536, n_layer=48, n_head=24),  # 1.4B
    "XXXL": GPTConfig(dim=2560, n_layer=48, n_head=40),  # 3.9B
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # normalise in fp32 even under autocast
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=False)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Projects text-encoder features to the prefix tokens.

    `uncond_embedding` is a fixed random caption (a buffer, as in LlamaGen, so it is never trained) that
    replaces dropped captions in training and forms the unconditional rows of classifier-free guidance.
    """

    def __init__(self, caption_dim: int, dim: int, token_num: int):
        super().__init__()
        self.cap_proj = MLP(caption_dim, dim, dim)
        self.register_buffer("uncond_embedding", torch.randn(token_num, caption_dim) / caption_dim**0.5)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.cap_proj(caption)


class FeedForward(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = int(2 * 4 * config.dim / 3)
        if config.ffn_dim_multiplier is not None:
            hidden = int(config.ffn_dim_multiplier * hidden)
        hidden = -(-hidden // config.multiple_of) * config.multiple_of
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class KVCache:
    """Keys/values of one layer, allocated on first use so they take the dtype autocast produced."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            shape = (*k.shape[:2], self.max_len, k.shape[-1])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.wqkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x, rope, mask, cache: KVCache | None, start_pos: int) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.wqkv(x).view(B, L, 3, self.n_head, D // self.n_head).unbind(2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, hd)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(B, L, D))


class TransformerBlock(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, rope, mask, cache, start_pos):
        x = x + self.attention(self.attention_norm(x), rope, mask, cache, start_pos)
        return x + self.feed_forward(self.ffn_norm(x))


def precompute_rope_2d(grid_size: int, head_dim: int, base: float, n_prefix: int) -> torch.Tensor:
    """(n_prefix + grid_size**2, head_dim // 2, 2) cos/sin table: half the pairs rotate with the row,
    half with the column of each image token.

    The caption rows are all zeros, exactly as in LlamaGen. That is not the identity rotation: it zeroes
    the caption tokens' queries and keys (they contribute through their values only). The released
    weights were trained that way, so we keep it.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    angles = torch.outer(torch.arange(grid_size).float(), freqs)  # (grid, head_dim // 4)
    grid = torch.cat(
        [angles[:, None, :].expand(-1, grid_size, -1), angles[None, :, :].expand(grid_size, -1, -1)], dim=-1
    )  # (row, col, head_dim // 2)
    table = torch.stack([grid.cos(), grid.sin()], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(n_prefix, half, 2), table])


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x (B, L, H, hd) by the angles in rope (L, hd // 2, 2), in fp32."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
    out = torch.stack([xf[..., 0] * cos - xf[..., 1] * sin, xf[..., 1] * cos + xf[..., 0] * sin], dim=-1)
    return out.flatten(3).type_as(x)


def attention_mask(prefix_mask: torch.Tensor | None, start: int, end: int, device) -> torch.Tensor:
    """Boolean mask (B or 1, 1, end - start, end) for query positions start..end-1 over keys 0..end-1.

    Causal, and padded caption slots (prefix_mask False) are hidden from every query; each position still
    sees itself so no softmax row is empty. This is LlamaGen's training and sampling mask.
    """
    q = torch.arange(start, end, device=device)[:, None]
    k = torch.arange(end, device=device)[None, :]
    allowed = k <= q
    if prefix_mask is not None:
        visible = F.pad(prefix_mask.bool(), (0, max(end - prefix_mask.shape[1], 0)), value=True)[:, :end]
        allowed = (allowed & visible[:, None, :]) | (k == q)
    else:
        allowed = allowed[None]
    return allowed[:, None]


class GPT(nn.Module):
    """LlamaGen's t2i Transformer. The sequence is [caption prefix (cls_token_num) ; image codes]."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.cls_embedding = CaptionEmbedder(config.caption_dim, config.dim, config.cls_token_num)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        grid_size = round(config.block_size**0.5)
        if grid_size**2 != config.block_size:
            raise ValueError(f"block_size {config.block_size} is not a square number of image tokens")
        rope = precompute_rope_2d(grid_size, config.dim // config.n_head, config.rope_base, config.cls_token_num)
        self.register_buffer("freqs_cis", rope, persistent=False)  # recomputed, never read from checkpoints
        self.gradient_checkpointing = False  # recompute each layer in backward: activations O(1 layer)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # LlamaGen also zeroes `output`; we don't, so a freshly built replica's samples depend on the prompt.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)

    def new_caches(self, max_len: int) -> list[KVCache]:
        return [KVCache(max_len) for _ in self.layers]

    def forward(
        self,
        idx: torch.Tensor | None,
        caption: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
        start_pos: int = 0,
        caches: list[KVCache] | None = None,
        logits_from: int = 0,
    ) -> torch.Tensor:
        """fp32 logits (B, L - logits_from, vocab) for the positions starting at start_pos + logits_from: the
        output head only runs where logits are wanted (-1: the last position, as sampling needs).

        caption (B, cls_token_num, caption_dim) and/or image codes idx (B, N) fill those positions, in that
        order; prefix_mask (B, cls_token_num) marks real caption tokens (None: all real). Without caches
        pass the whole sequence from 0; with caches, pass only the new positions.
        """
        parts = []
        if caption is not None:
            if caption.shape[1] != self.config.cls_token_num:
                raise ValueError(f"caption has {caption.shape[1]} tokens, expected {self.config.cls_token_num}")
            parts.append(self.cls_embedding(caption))
        if idx is not None:
            parts.append(self.tok_embeddings(idx))
        h = torch.cat(parts, dim=1)
        end = start_pos + h.shape[1]
        mask = attention_mask(prefix_mask, start_pos, end, h.device)
        rope = self.freqs_cis[start_pos:end]
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and caches is None and torch.is_grad_enabled():
                h = checkpoint(layer, h, rope, mask, None, start_pos, use_reentrant=False)
            else:
                h = layer(h, rope, mask, None if caches is None else caches[i], start_pos)
        return self.output(self.norm(h[:, logits_from:])).float()


# -----------------------------------------------------------------------------
# VQ image tokenizer


@dataclass(frozen=True)
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    num_res_blocks: int = 2

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


VQ_SIZES: dict[str, VQConfig] = {
    "tiny": VQConfig(codebook_size=512, ch=32, ch_mult=(1, 2, 2, 4), z_channels=32),
    # The miniature world's tokenizer (testbed.world): 4x downsampling, so a 32 px image is 8x8 codes.
    "world": VQConfig(codebook_size=512, ch=32, ch_mult=(1, 2, 2), z_channels=32, num_res_blocks=1),
    "VQ-8": VQConfig(ch_mult=(1, 2, 2, 4)),
    "VQ-16": VQConfig(ch_mult=(1, 1, 2, 2, 4)),
}


# Own copies of taming's Level, mid, Encoder and Decoder (ar_models.vq_blocks): LlamaGen's VQ names them
# `conv_blocks.<i>.res` and `mid.<0-2>`, and orders the decoder's levels from the deepest one.
class Level(nn.Module):
    """One resolution of the encoder/decoder: res blocks, attention at the lowest resolution, resampling."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, attn: bool, resample: str | None):
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch) for i in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_ch) for _ in range(n_blocks if attn else 0))
        if resample == "down":
            self.downsample = Downsample(out_ch)
        elif resample == "up":
            self.upsample = Upsample(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


def _mid(ch: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(ch, ch), AttnBlock(ch), ResnetBlock(ch, ch)])


class Encoder(nn.Module):
    """RGB -> latents in LlamaGen's layout (the Decoder mirrors it)."""

    def __init__(self, c: VQConfig):
        super().__init__()
        n = len(c.ch_mult)
        chans = [c.ch * m for m in (1, *c.ch_mult)]
        self.conv_in = nn.Conv2d(3, c.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList(
            Level(chans[i], chans[i + 1], c.num_res_blocks, attn=i == n - 1, resample="down" if i < n - 1 else None)
            for i in range(n)
        )
        self.mid = _mid(chans[-1])
        self.norm_out = group_norm(chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for m in (*self.conv_blocks, *self.mid):
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents -> RGB in LlamaGen's layout: `conv_blocks[0]` is the deepest level."""

    def __init__(self, c: VQConfig):
        super().__init__()
        n = len(c.ch_mult)
        chans = [c.ch * m for m in reversed(c.ch_mult)]
        self.conv_in = nn.Conv2d(c.z_channels, chans[0], 3, padding=1)
        self.mid = _mid(chans[0])
        self.conv_blocks = nn.ModuleList(
            Level(chans[max(i - 1, 0)], chans[i], c.num_res_blocks + 1, attn=i == 0,
                  resample="up" if i < n - 1 else None)
            for i in range(n)
        )
        self.norm_out = group_norm(chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for m in (*self.mid, *self.conv_blocks):
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour lookup between l2-normalised latents and l2-normalised codes (cosine similarity)."""

    def __init__(self, codebook_size: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)
        # Training-time usage statistics; unused here but kept so state dicts match the releases key for key.
        self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, dim=-1)

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, C, H, W) -> code indices (B, H*W)."""
        flat = F.normalize(z.flatten(2).transpose(1, 2), dim=-1)  # (B, HW, C)
        return (flat @ self.codebook().T).argmax(-1)  # max cosine = min l2 distance on the sphere

    def lookup(self, codes: torch.Tensor, grid_size: int) -> torch.Tensor:
        """codes (B, H*W) -> latents (B, C, H, W)."""
        z = self.codebook()[codes]
        return z.view(codes.shape[0], grid_size, grid_size, -1).permute(0, 3, 1, 2).contiguous()


class VQModel(VQAutoencoder):
    """LlamaGen's VQ tokenizer (cosine codebook lookup)."""

    def __init__(self, config: VQConfig):
        encoder, decoder = Encoder(config), Decoder(config)  # built before the codebook: the order fixes random init
        quantize = VectorQuantizer(config.codebook_size, config.codebook_embed_dim)
        super().__init__(config, encoder, decoder, quantize, config.codebook_embed_dim)


# -----------------------------------------------------------------------------
# Checkpoints

# Tensors the official code may leave in a state dict that we rebuild instead of loading.
_GPT_EXTRAS = re.compile(r"freqs_cis|causal_mask|layers\.\d+\.attention\.kv_cache\.[kv]_cache")


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from .safetensors, a bare state dict, or LlamaGen's training wrappers."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    # Training checkpoints also pickle their argparse args next to the weights.
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        for wrapper in ("model", "module", "state_dict"):  # DDP, DeepSpeed, generic (as sample_t2i.py)
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict (name -> tensor, optionally under 'model'/'module'/'state_dict')")
    return obj


def load_gpt_checkpoint(path: str | os.PathLike, config: GPTConfig) -> GPT:
    """A LlamaGen t2i GPT checkpoint (.pt/.pth/.safetensors) -> GPT in eval mode; ValueError on any mismatch."""
    model = GPT(config)
    load_strict(model, path, _read_state_dict(path), _GPT_EXTRAS)
    return model.eval()


def load_vq_checkpoint(path: str | os.PathLike, config: VQConfig) -> VQModel:
    """A LlamaGen VQ checkpoint -> VQModel in eval mode; ValueError on any mismatch."""
    model = VQModel(config)
    load_strict(model, path, _read_state_dict(path))
    return model.eval()


# -----------------------------------------------------------------------------
# Student


class LlamaGenStudent(T5Student):
    """GPT + VQ + frozen T5 encoder behind the `ARStudent` interface. Only `gpt` is meant to be trained."""

    def __init__(self, gpt: GPT, vq: VQModel, text_encoder: nn.Module, tokenizer, image_size: int):
        super().__init__()
        grid = image_size // vq.config.downsample
        if grid * vq.config.downsample != image_size or grid**2 != gpt.config.block_size:
            raise ValueError(f"image_size {image_size}: {grid}x{grid} codes, GPT expects {gpt.config.block_size}")
        if gpt.config.vocab_size != vq.config.codebook_size:
            raise ValueError(f"GPT vocab {gpt.config.vocab_size} != VQ codebook {vq.config.codebook_size}")
        self.gpt, self.vq, self.image_size = gpt, vq, image_size
        self.attach_text_encoder(text_encoder, tokenizer, gpt.config.caption_dim)
        self.freeze("vq", "text_encoder")

    @classmethod  # the signature `T5Student.from_params` calls, as every T5 family's
    def from_paths(cls, checkpoint: str | os.PathLike, vq_checkpoint: str | os.PathLike,
                   text_encoder: str | os.PathLike, size: str = "tiny", vq_size: str = "tiny",
                   image_size: int = 64) -> LlamaGenStudent:
        """Load released-format weights; text_encoder is a local `save_pretrained` folder (model + tokenizer)."""
        gpt_config, vq_config = pick(GPT_SIZES, size, "GPT"), pick(VQ_SIZES, vq_size, "VQ")
        if image_size % vq_config.downsample:
            raise ValueError(f"image_size {image_size} is not a multiple of VQ downsampling {vq_config.downsample}")
        gpt_config = replace(gpt_config, block_size=(image_size // vq_config.downsample) ** 2)
        encoder, tokenizer = cls.load_text_encoder(text_encoder)
        return cls(load_gpt_checkpoint(checkpoint, gpt_config), load_vq_checkpoint(vq_checkpoint, vq_config),
                   encoder, tokenizer, image_size)

    @property
    def device(self) -> torch.device:
        return self.gpt.tok_embeddings.weight.device

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.vq.encode(images.to(self.device))

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vq.decode_code(tokens.to(self.device)).clamp(-1, 1)

    def encode_prompts(self, prompts: list[str]) -> PromptBatch:
        """T5 features padded/truncated to cls_token_num, then left-padded as LlamaGen's t2i does: real tokens
        (EOS included) sit at the end, padded slots are zero and masked out."""
        T = self.gpt.config.cls_token_num
        batch = self.tokenizer(
            [p.lower().strip() for p in prompts],  # LlamaGen's preprocessing without its caption cleaner
            max_length=T, padding="max_length", truncation=True, return_tensors="pt",
        ).to(self.text_encoder.device)
        feats = self.text_encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        shift = T - batch.attention_mask.sum(1, keepdim=True)  # (B, 1) padding length
        pos = torch.arange(T, device=feats.device)[None]
        feats = feats.gather(1, ((pos - shift) % T)[..., None].expand_as(feats))  # rotate right by shift
        mask = pos >= shift
        return PromptBatch(features=(feats * mask[..., None]).to(self.device), mask=mask.to(self.device))

    def _caption(self, cond: PromptBatch) -> torch.Tensor:
        return cond.features.to(self.device, self.gpt.cls_embedding.uncond_embedding.dtype)

    def logits(self, cond: PromptBatch, tokens: torch.Tensor, cond_dropout: float = 0.0) -> torch.Tensor:
        """Logits for every image code. With probability cond_dropout a row's caption becomes the
        unconditional embedding (its mask is kept, as in LlamaGen), which is what makes CFG work."""
        caption, T = self._caption(cond), self.gpt.config.cls_token_num
        if cond_dropout > 0:
            drop = torch.rand(caption.shape[0], device=caption.device) < cond_dropout
            caption = torch.where(drop[:, None, None], self.gpt.cls_embedding.uncond_embedding, caption)
        return self.gpt(tokens[:, :-1], caption, cond.mask.to(self.device), logits_from=T - 1)

    @torch.no_grad()
    def sample_tokens(self, cond: PromptBatch, cfg_scale: float = 4.0, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, seed: int = 0, use_cache: bool = True,
                      autocast: bool = False) -> torch.Tensor:
        """Image codes (B, N). Conditional and unconditional rows share one batched forward per step, guided
        as uncond + cfg_scale * (cond - uncond); the unconditional rows reuse the prompt's mask (LlamaGen)."""
        caption, mask = self._caption(cond), cond.mask.to(self.device)
        B, T, N = caption.shape[0], self.gpt.config.cls_token_num, self.gpt.config.block_size
        guided = cfg_scale != 1.0
        if guided:
            uncond = self.gpt.cls_embedding.uncond_embedding.expand(B, -1, -1)
            caption, mask = torch.cat([caption, uncond]), torch.cat([mask, mask])
        generator = torch.Generator(self.device).manual_seed(seed)
        caches = self.gpt.new_caches(T + N) if use_cache else None
        tokens = torch.empty(caption.shape[0], 0, dtype=torch.long, device=self.device)
        with bf16_weight_cache(self.gpt, autocast), torch.autocast(self.device.type, torch.bfloat16, enabled=autocast):
            logits = self.gpt(None, caption, mask, caches=caches, logits_from=-1)[:, -1]  # the prefix, once
            for i in range(N):
                nxt = sample_guided(logits, cfg_scale, temperature, top_k, top_p, generator)
                tokens = torch.cat([tokens, nxt.repeat(2 if guided else 1)[:, None]], dim=1)
                if i == N - 1:
                    break
                if use_cache:
                    logits = self.gpt(tokens[:, -1:], None, mask, start_pos=T + i, caches=caches)[:, -1]
                else:
                    logits = self.gpt(tokens, caption, mask, logits_from=-1)[:, -1]
        return tokens[:B]

    def parameter_groups(self) -> dict[str, list[str]]:
        """Groups of `self.named_parameters()` names (GPT weights plus the T5 token table); matches peft-wrapped
        names too."""
        rules = {  # group -> regex over this family's parameter names
            "text_embedding": r"^text_encoder\.shared\.",
            "caption_embedder": r"\.cls_embedding\.",
            "tok_embeddings": r"\.tok_embeddings\.",
            "attn_qkv": r"\.attention\.wqkv\.",
            "attn_out": r"\.attention\.wo\.",
            "mlp": r"\.feed_forward\.",
            "norms": r"(_norm|\.norm)\.",
            "output": r"\.output\.",
        }
        # no cross-attention: the caption is a prefix of the sequence
        return self.group_parameters(rules, layer=r"\.layers\.(\d+)\.", skip=r"^(vq|text_encoder)\.(?!shared\.)")

    def lora_target_modules(self) -> list[str]:
        return ["wqkv", "wo", "w1", "w2", "w3"]

    def enable_gradient_checkpointing(self) -> None:
        self.gpt.gradient_checkpointing = True

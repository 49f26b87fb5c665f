"""The conv autoencoder of taming-transformers' VQGAN, in pieces.

LlamaGen's VQ, Chameleon's VQGAN and VAR's VQVAE all descend from it and keep its module names (`norm1`,
`conv1`, `nin_shortcut`, `down.<i>.block`, `mid.block_1`, ...), so these pieces build all three key for key.
Where a release renamed or fused modules, the family keeps its own copy of that piece next to its model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Two norm-SiLU-conv steps plus the input; a 1x1 `nin_shortcut` only where the channel count changes."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convs as projections."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = group_norm(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # (B, HW, C)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as taming-transformers


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: `block` res blocks, each followed by an `attn` block when given, then resampling."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, attn: type[nn.Module] | None, resample: str | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch) for i in range(n_blocks))
        self.attn = nn.ModuleList(attn(out_ch) for _ in range(n_blocks if attn else 0))
        if resample == "down":
            self.downsample = Downsample(out_ch)
        elif resample == "up":
            self.upsample = Upsample(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Mid(nn.Module):
    def __init__(self, ch: int, attn: type[nn.Module]):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(ch, ch), attn(ch), ResnetBlock(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """RGB -> z_channels latents, downsampling after every level but the last. `c` is any config with `ch`,
    `ch_mult`, `num_res_blocks` and `z_channels`; the levels in `attn_levels` get `attn` after each res block."""

    def __init__(self, c, attn_levels: tuple[int, ...], attn: type[nn.Module] = AttnBlock):
        super().__init__()
        n, chans = len(c.ch_mult), [c.ch * m for m in (1, *c.ch_mult)]
        self.conv_in = nn.Conv2d(3, c.ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(chans[i], chans[i + 1], c.num_res_blocks, attn if i in attn_levels else None,
                  "down" if i < n - 1 else None)
            for i in range(n)
        )
        self.mid = Mid(chans[-1], attn)
        self.norm_out = group_norm(chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Latents -> RGB. `up[i]` works at resolution level i (0 = full size); like taming, the levels are built and
    run from the deepest one. Arguments as `Encoder`'s."""

    def __init__(self, c, attn_levels: tuple[int, ...], attn: type[nn.Module] = AttnBlock):
        super().__init__()
        ch_in = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, ch_in, 3, padding=1)
        self.mid = Mid(ch_in, attn)
        levels = []
        for i in reversed(range(len(c.ch_mult))):
            ch_out = c.ch * c.ch_mult[i]
            levels.insert(0, Level(ch_in, ch_out, c.num_res_blocks + 1, attn if i in attn_levels else None,
                                   "up" if i > 0 else None))
            ch_in = ch_out
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(ch_in)
        self.conv_out = nn.Conv2d(ch_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQAutoencoder(nn.Module):
    """taming's VQModel at inference: encoder -> quant_conv -> nearest code, and back through post_quant_conv and
    the decoder. `quantize` maps latents (B, C, h, w) to codes (B, h*w) and `lookup`s codes back."""

    def __init__(self, config, encoder: nn.Module, decoder: nn.Module, quantize: nn.Module, embed_dim: int):
        super().__init__()
        self.config = config
        self.encoder, self.decoder, self.quantize = encoder, decoder, quantize
        self.quant_conv = nn.Conv2d(config.z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, config.z_channels, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> codes (B, (H/ds) * (W/ds)), raster order."""
        return self.quantize.quantize(self.quant_conv(self.encoder(images)))

    def decode_code(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, N) of a square grid -> images (B, 3, H, W), not clamped."""
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes, round(codes.shape[1] ** 0.5))))

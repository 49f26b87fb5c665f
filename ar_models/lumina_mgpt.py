"""Lumina-mGPT text-to-image student (Liu et al. 2024, "Lumina-mGPT: Illuminate Flexible Photorealistic
Text-to-Image Generation with Multimodal Generative Pretraining").

A Chameleon decoder (transformers' `ChameleonForConditionalGeneration`, loaded from the released HF folders
with their own key names) reads one token stream: the prompt as a chat turn, then the image as Chameleon
VQGAN codes written as text-vocabulary tokens (`IMGIMG...`), with an image-start token, two size tokens and
an end-of-line token after every row. transformers' Chameleon has no VQGAN decoder, so the image tokenizer
is our own taming-transformers VQModel that loads Meta's `vqgan.ckpt` + `vqgan.yaml` key for key.

Layout of one image turn (Lumina-mGPT's `FlexARItemProcessor` and inference solver):

    <s> Generate an image of {W}x{H} according to the following prompt:\\n{prompt} <reserved08706>
    <racm3:break> <reserved0{8800+h}> <reserved0{8800+w}> [codes of row 0] <reserved08799> ... <eoss>

where h, w count 2x2 blocks of VQ codes (32-pixel patches for the 16x VQGAN). Classifier-free guidance's
unconditional stream is the same turn with no prompt at all: it starts at <racm3:break>.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from ar_models.base import ARStudent, PromptBatch
from ar_models.loading import check_keys, pick, quiet_transformers
from ar_models.sampling import sample_guided
from ar_models.vq_blocks import Decoder, Encoder, VQAutoencoder

PROMPT_TEMPLATE = "Generate an image of {w}x{h} according to the following prompt:\n{prompt}"
IMAGE_START, IMAGE_END = "<racm3:break>", "<eoss>"
END_OF_TURN, END_OF_LINE = "<reserved08706>", "<reserved08799>"


def size_token(n: int) -> str:
    """The token that states an image side of n patches (`get_n_grids_token` in Lumina-mGPT)."""
    return f"<reserved{8800 + n:05d}>"


# -----------------------------------------------------------------------------
# Decoder (transformers' Chameleon)


@dataclass(frozen=True)
class DecoderSize:
    """The architecture fields a released folder's config.json must match for a named size."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    swin_norm: bool = False


DECODER_SIZES: dict[str, DecoderSize] = {
    "tiny": DecoderSize(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4),
    "7B": DecoderSize(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32),  # Chameleon-7B, the base of Lumina-mGPT-7B-{512,768,1024}
}


def _safetensors_shapes(folder: Path) -> dict[str, tuple]:
    """Tensor name -> shape from a HF folder's (possibly sharded) safetensors, reading headers only."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    shapes = {}
    for name in files:
        with safe_open(str(folder / name), "pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def load_decoder(folder: str | os.PathLike, size: str, dtype: torch.dtype = torch.float32):
    """A Lumina-mGPT / Chameleon HF folder -> `ChameleonForConditionalGeneration` in eval mode, without the
    VQ encoder transformers puts inside (Lumina-mGPT deletes it before saving; we tokenize with `VQGAN`).

    ValueError (one line, naming the file) when config.json is not the named size or a tensor is missing,
    unexpected or mis-shaped; `model.vqmodel.*` tensors (Chameleon's own conversions keep them) are skipped."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    folder, want = Path(folder), pick(DECODER_SIZES, size, "decoder")
    config = ChameleonConfig.from_pretrained(folder, local_files_only=True)
    for name, value in asdict(want).items():
        if getattr(config, name) != value:
            raise ValueError(f"{folder / 'config.json'}: {name} {getattr(config, name)} != {value} of size {size!r}")
    if not config.vocabulary_map:
        raise ValueError(f"{folder / 'config.json'}: no vocabulary_map (the IMGIMG image-token names are needed)")
    with torch.device("meta"):
        skeleton = ChameleonForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items() if not k.startswith("model.vqmodel.")}
    found = {k: v for k, v in _safetensors_shapes(folder).items() if not k.startswith("model.vqmodel.")}
    check_keys(folder, "ChameleonForConditionalGeneration", expected, found)
    with quiet_transformers():
        model = ChameleonForConditionalGeneration.from_pretrained(folder, dtype=dtype, local_files_only=True)
    del model.model.vqmodel
    return model.eval()


# -----------------------------------------------------------------------------
# VQGAN image tokenizer (taming-transformers layout, as Meta's chameleon/vqgan.py)


@dataclass(frozen=True)
class VQGANConfig:
    """`model.params` of vqgan.yaml: n_embed, embed_dim, and the ddconfig fields."""

    n_embed: int = 8192
    embed_dim: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    z_channels: int = 256
    resolution: int = 512
    in_channels: int = 3
    out_ch: int = 3
    double_z: bool = False

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def attn_levels(self) -> tuple[int, ...]:
        """The levels (0 = full size) whose resolution `attn_resolutions` lists."""
        return tuple(i for i in range(len(self.ch_mult)) if self.resolution >> i in self.attn_resolutions)


VQ_SIZES: dict[str, VQGANConfig] = {
    "tiny": VQGANConfig(n_embed=64, embed_dim=16, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=32,
                        resolution=64),
    "chameleon": VQGANConfig(),  # Meta's chameleon/tokenizer/vqgan.yaml
}
_DDCONFIG = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution", "in_channels",
             "out_ch", "double_z")


def read_vq_config(path: str | os.PathLike) -> VQGANConfig:
    """vqgan.yaml -> VQGANConfig; one-line ValueError naming the file and the missing/invalid field."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({type(e).__name__})") from None

    def need(mapping, key: str, where: str):
        if not isinstance(mapping, dict) or key not in mapping:
            raise ValueError(f"{path}: {where}{key} is missing (expected a taming VQModel config)")
        return mapping[key]

    params = need(need(doc, "model", ""), "params", "model.")
    values = {k: need(params, k, "model.params.") for k in ("n_embed", "embed_dim")}
    dd = need(params, "ddconfig", "model.params.")
    values.update({k: need(dd, k, "model.params.ddconfig.") for k in _DDCONFIG})
    config = VQGANConfig(**{k: tuple(v) if k in ("ch_mult", "attn_resolutions") else v for k, v in values.items()})
    if config.double_z or config.in_channels != 3 or config.out_ch != 3 or any(c * config.ch % 32 for c in config.ch_mult):
        raise ValueError(f"{path}: unsupported VQGAN (needs double_z false, 3 channels in/out, ch*ch_mult % 32 == 0)")
    return config


def write_vq_config(path: Path, config: VQGANConfig) -> None:
    dd = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items() if k in _DDCONFIG}
    doc = {"model": {"target": "taming.models.vqgan.VQModel",
                     "params": {"embed_dim": config.embed_dim, "n_embed": config.n_embed,
                                "ddconfig": {**dd, "dropout": 0.0}}}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


class VectorQuantizer(nn.Module):
    """taming's VectorQuantizer2 at inference: nearest code in plain l2 distance (no normalisation)."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, C, H, W) -> code indices (B, H*W), raster order."""
        flat = z.flatten(2).transpose(1, 2)  # (B, HW, C)
        e = self.embedding.weight
        d = flat.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1) - 2 * flat @ e.T
        return d.argmin(-1)

    def lookup(self, codes: torch.Tensor, grid: int) -> torch.Tensor:
        """codes (B, grid*grid) -> latents (B, C, grid, grid)."""
        return self.embedding(codes).view(codes.shape[0], grid, grid, -1).permute(0, 3, 1, 2).contiguous()


class VQGAN(VQAutoencoder):
    """Chameleon's image tokenizer; module names are taming's, so `vqgan.ckpt` loads with no renaming."""

    def __init__(self, config: VQGANConfig):
        encoder, decoder = Encoder(config, config.attn_levels), Decoder(config, config.attn_levels)
        quantize = VectorQuantizer(config.n_embed, config.embed_dim)
        super().__init__(config, encoder, decoder, quantize, config.embed_dim)


# Training-only parts of a taming checkpoint (discriminator, LPIPS) that inference never needs.
_VQ_TRAINING_KEYS = re.compile(r"loss\..*")


def load_vqgan(ckpt: str | os.PathLike, config_path: str | os.PathLike) -> VQGAN:
    """Meta's vqgan.ckpt ({"state_dict": ...}, taming key names) + vqgan.yaml -> VQGAN in eval mode.
    One-line ValueError naming the file and tensor on any missing, unexpected or mis-shaped key."""
    model = VQGAN(read_vq_config(config_path))
    try:
        obj = torch.load(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{ckpt}: not loadable with weights_only=True ({first})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{ckpt}: not a VQGAN checkpoint (expected a 'state_dict' of name -> tensor)")
    state = {k: v for k, v in state.items() if not _VQ_TRAINING_KEYS.fullmatch(k)}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(ckpt, f"the VQGAN of {config_path}", expected, {k: tuple(v.shape) for k, v in state.items()})
    model.load_state_dict(state)
    return model.eval()


# -----------------------------------------------------------------------------
# Student


class LuminaMGPTStudent(ARStudent):
    """Chameleon decoder + VQGAN + the decoder's own tokenizer behind `ARStudent`. Only `decoder` trains.

    `PromptBatch.features` are the decoder's input embeddings of the prompt turn (left-padded to
    `max_prompt_tokens`, leaving slots for learned prefix vectors); the image turn is appended by `logits` and
    sampling. Logits are over the VQ codebook: the lm_head rows of the `IMGIMG` tokens, in code order."""

    def __init__(self, decoder, vq: VQGAN, tokenizer, image_size: int, max_prompt_tokens: int = 128):
        super().__init__()
        ds = vq.config.downsample
        if image_size % (2 * ds):
            raise ValueError(f"image_size {image_size} is not a multiple of 2 x VQ downsampling ({2 * ds})")
        self.decoder, self.vq, self.tokenizer = decoder, vq, tokenizer
        self.image_size, self.grid = image_size, image_size // ds
        self.max_prompt_tokens = max_prompt_tokens
        mapping = decoder.model.vocabulary_mapping  # transformers' IMGIMG name <-> VQ code translation
        codes = sorted(mapping.img2bpe)
        if codes != list(range(vq.config.n_embed)):
            raise ValueError(f"decoder vocabulary has {len(codes)} IMGIMG tokens, VQGAN has {vq.config.n_embed} codes")
        self.register_buffer("image_ids", torch.tensor([mapping.img2bpe[c] for c in codes]), persistent=False)
        names = [IMAGE_START, size_token(self.grid // 2), size_token(self.grid // 2), END_OF_LINE, END_OF_TURN]
        ids = tokenizer.convert_tokens_to_ids(names)
        unknown = [n for n, i in zip(names, ids) if i is None or i == tokenizer.unk_token_id]
        if unknown or tokenizer.bos_token_id is None:
            raise ValueError(f"tokenizer lacks Lumina-mGPT tokens {unknown or ['bos_token']}")
        self.register_buffer("header_ids", torch.tensor(ids[:3]), persistent=False)
        self.eol_id, self.eot_id = ids[3], ids[4]
        self.freeze("vq")

    @classmethod
    def from_paths(cls, checkpoint: str | os.PathLike, vq_checkpoint: str | os.PathLike, vq_config: str | os.PathLike,
                   tokenizer: str | os.PathLike | None = None, size: str = "tiny", image_size: int = 64,
                   max_prompt_tokens: int = 128, dtype: str = "float32") -> LuminaMGPTStudent:
        """Released-format weights: a Lumina-mGPT HF folder (its tokenizer too, unless `tokenizer` names one),
        Meta's vqgan.ckpt and vqgan.yaml."""
        from transformers import AutoTokenizer

        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
        decoder = load_decoder(checkpoint, size, getattr(torch, dtype))
        tok = AutoTokenizer.from_pretrained(tokenizer or checkpoint, local_files_only=True)
        return cls(decoder, load_vqgan(vq_checkpoint, vq_config), tok, image_size, max_prompt_tokens)

    @classmethod
    def from_params(cls, student: dict) -> LuminaMGPTStudent:
        """`student` keys: checkpoint (HF folder), vq_checkpoint, vq_config, size, image_size; optional
        tokenizer (folder), max_prompt_tokens, dtype."""
        from ar_models import require_file

        return cls.from_paths(
            checkpoint=require_file(student, "checkpoint", folder=True),
            vq_checkpoint=require_file(student, "vq_checkpoint"), vq_config=require_file(student, "vq_config"),
            tokenizer=require_file(student, "tokenizer", folder=True) if student.get("tokenizer") else None,
            size=student["size"], image_size=int(student["image_size"]),
            max_prompt_tokens=int(student.get("max_prompt_tokens", 128)), dtype=student.get("dtype", "float32"),
        )

    @property
    def device(self) -> torch.device:
        return self.text_embedding.weight.device

    @property
    def text_embedding(self) -> nn.Embedding:
        return self.decoder.get_input_embeddings()

    def set_text_embedding(self, embedding: nn.Embedding) -> None:
        self.decoder.set_input_embeddings(embedding)

    # -- images

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, the student takes {self.image_size}px squares")
        return self.vq.encode(images.to(self.device, torch.float32))

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vq.decode_code(tokens.to(self.device)).clamp(-1, 1)

    # -- sequence layout

    def encode_prompts(self, prompts: list[str]) -> PromptBatch:
        """`<s> {template with prompt} <reserved08706>` embedded by the decoder, left-padded to max_prompt_tokens
        (a long prompt loses its end, never the turn's frame)."""
        L = self.max_prompt_tokens
        text = [PROMPT_TEMPLATE.format(w=self.image_size, h=self.image_size, prompt=p) for p in prompts]
        rows = [[self.tokenizer.bos_token_id, *ids[: L - 2], self.eot_id]
                for ids in self.tokenizer(text, add_special_tokens=False)["input_ids"]]
        ids = torch.full((len(rows), L), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros(len(rows), L, dtype=torch.bool)
        for b, row in enumerate(rows):
            ids[b, L - len(row):], mask[b, L - len(row):] = torch.tensor(row), True
        ids, mask = ids.to(self.device), mask.to(self.device)
        return PromptBatch(features=self.text_embedding(ids) * mask[..., None], mask=mask)

    def image_body(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ codes (B, N) -> token ids (B, rows * (cols + 1)): IMGIMG ids with end-of-line after every row."""
        rows = self.image_ids[codes].view(codes.shape[0], self.grid, self.grid)
        return torch.cat([rows, torch.full_like(rows[..., :1], self.eol_id)], dim=-1).flatten(1)

    def _forward(self, cond: PromptBatch, body: torch.Tensor, prompt_visible: torch.Tensor | None = None,
                 cache=None, use_cache: bool = False):
        """Decoder hidden states for [prompt ; image header ; body], or with a filled `cache` for the tokens of
        `body` it has not seen yet. Returns (hidden states, cache).

        Padded prompt slots are masked out and skipped by the position ids, so a row whose prompt is hidden
        (`prompt_visible` False) is exactly Lumina-mGPT's unconditional stream, starting at position 0."""
        mask = cond.mask.to(self.device)
        if prompt_visible is not None:
            mask = mask & prompt_visible[:, None]
        mask = torch.cat([mask, mask.new_ones(body.shape[0], 3 + body.shape[1])], dim=1)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        past = cache.get_seq_length() if cache is not None else 0
        if past:
            x = self.text_embedding(body[:, past - mask.shape[1]:])
        else:
            ids = torch.cat([self.header_ids.expand(body.shape[0], -1), body], dim=1)
            x = self.text_embedding(ids)
            x = torch.cat([cond.features.to(self.device, x.dtype), x], dim=1)
        out = self.decoder.model(inputs_embeds=x, attention_mask=mask, position_ids=positions[:, past:],
                                 past_key_values=cache, use_cache=use_cache)
        return out.last_hidden_state, out.past_key_values

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits over the VQ codebook from the lm_head rows of the IMGIMG tokens (transformers'
        ChameleonForConditionalGeneration.forward would mask exactly these out, for text chat)."""
        return F.linear(hidden, self.decoder.lm_head.weight[self.image_ids]).float()

    def logits(self, cond: PromptBatch, tokens: torch.Tensor, cond_dropout: float = 0.0) -> torch.Tensor:
        """Teacher-forced (B, N, n_embed) logits for the N codes through the full layout (end-of-line tokens
        included as inputs, never scored). Dropped rows (prob. cond_dropout) see no prompt, as Lumina's CFG."""
        tokens = tokens.to(self.device)
        visible = None
        if cond_dropout > 0:
            visible = torch.rand(tokens.shape[0], device=self.device) >= cond_dropout
        hidden, _ = self._forward(cond, self.image_body(tokens)[:, :-2], visible)
        g = self.grid
        code_pos = (torch.arange(g, device=self.device)[:, None] * (g + 1) + torch.arange(g, device=self.device)).flatten()
        return self.image_logits(hidden[:, cond.mask.shape[1] + 2 + code_pos])

    @torch.no_grad()
    def sample_tokens(self, cond: PromptBatch, cfg_scale: float = 4.0, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, seed: int = 0, use_cache: bool = True,
                      autocast: bool = False) -> torch.Tensor:
        """VQ codes (B, N). Conditional and unconditional (prompt hidden) rows share one batched forward per
        code; logits are guided as uncond + cfg_scale * (cond - uncond), then temperature, top-k over image
        tokens (Lumina's image_top_k), top-p. End-of-line tokens are forced, costing no sampling step."""
        B, N, g = cond.features.shape[0], self.grid**2, self.grid
        guided = cfg_scale != 1.0
        visible = torch.ones(B, dtype=torch.bool, device=self.device)
        if guided:
            cond = PromptBatch(torch.cat([cond.features, cond.features]), torch.cat([cond.mask, cond.mask]))
            visible = torch.cat([visible, torch.zeros_like(visible)])
        generator = torch.Generator(self.device).manual_seed(seed)
        body = torch.empty(cond.features.shape[0], 0, dtype=torch.long, device=self.device)
        codes = []
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            hidden, cache = self._forward(cond, body, visible, use_cache=use_cache)  # prompt + header, once
            for i in range(N):
                logits = self.image_logits(hidden[:, -1])
                code = sample_guided(logits, cfg_scale, temperature, top_k, top_p, generator)
                codes.append(code)
                if i == N - 1:
                    break
                step = self.image_ids[code.repeat(2 if guided else 1)][:, None]
                if (i + 1) % g == 0:
                    step = torch.cat([step, torch.full_like(step, self.eol_id)], dim=1)
                body = torch.cat([body, step], dim=1)
                hidden, cache = self._forward(cond, body, visible, cache, use_cache)
        return torch.stack(codes, dim=1)

    # -- training surface

    def parameter_groups(self) -> dict[str, list[str]]:
        """Groups of `self.named_parameters()` names (decoder only; the VQGAN is frozen); matches
        peft-wrapped names too. The token table is the text embedding: Chameleon has one vocabulary."""
        rules = {  # group -> regex over this family's parameter names
            "text_embedding": r"(^|\.)decoder\.model\.embed_tokens\.",
            "attn_qkv": r"\.self_attn\.[qkv]_proj\.",
            "attn_out": r"\.self_attn\.o_proj\.",
            "mlp": r"\.mlp\.",
            "norms": r"(_layernorm|\.self_attn\.[qk]_norm|\.model\.norm)\.",
            "output": r"(^|\.)decoder\.lm_head\.",
        }
        # no cross-attention: the prompt is part of the sequence
        return self.group_parameters(rules, layer=r"\.layers\.(\d+)\.", skip=r"(^|\.)vq\.")

    def lora_target_modules(self) -> list[str]:
        return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

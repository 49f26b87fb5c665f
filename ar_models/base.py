"""The small interface every AR student family implements.

Stages and tuning methods only talk to students through this, so adding a family never touches `tasks/`.
Images cross the interface as float tensors in [-1, 1], shape (B, 3, H, W).

What the tuning methods need from a family, and nothing more:
- `logits` (teacher-forced image-token logits) for the next-token loss, per-token loss weights and prior
  distillation (KL to a teacher's logits);
- `text_embedding` / `set_text_embedding` and `tokenizer` to add identifier tokens ([V], S_i) whose input
  embeddings are learned (Sun et al.);
- `PromptBatch` features in the space the transformer reads, so learnable prefix vectors (ARBooth) can be
  inserted before a prompt's tokens;
- `parameter_groups` to select exactly which weights train (Q/K/V, cross-attention, MLP, per layer).
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class ModelConfigError(ValueError):
    """A bad `student` parameter (unknown family or size, missing file, mismatched weights): its message is one
    line naming the parameter, for callers to print without a traceback."""


@dataclass
class PromptBatch:
    """Text condition for a batch: the vectors the transformer reads and their validity mask.

    `padding_side` says where padded slots sit; prefix insertion keeps that layout."""

    features: torch.Tensor  # (B, L, D)
    mask: torch.Tensor  # (B, L) bool, True where a real token is
    padding_side: str = "left"

    def __getitem__(self, rows) -> PromptBatch:
        return PromptBatch(self.features[rows], self.mask[rows], self.padding_side)


def insert_prefix(cond: PromptBatch, prefix: torch.Tensor, rows: torch.Tensor | None = None) -> PromptBatch:
    """Put `prefix` (P, D) right before the real tokens of the selected rows (all rows when None).

    Left-padded batches keep their length (the prefix takes padding slots; a row with too little padding
    loses its first tokens); right-padded batches grow by P. Differentiable in `prefix`."""
    B, L, _ = cond.features.shape
    P = prefix.shape[0]
    rows = torch.ones(B, dtype=torch.bool, device=cond.features.device) if rows is None else rows
    prefix = prefix.to(cond.features.dtype)
    feats, masks = [], []
    for b in range(B):
        f, m = cond.features[b], cond.mask[b]
        real = f[m]
        pieces = [prefix, real] if bool(rows[b]) else [real]
        body = torch.cat(pieces)
        n_pad = (L if cond.padding_side == "left" else L + P) - body.shape[0]
        if n_pad < 0:
            body, n_pad = body[-n_pad:], 0
        pad = f.new_zeros(n_pad, f.shape[-1])
        valid = torch.ones(body.shape[0], dtype=torch.bool, device=m.device)
        invalid = torch.zeros(n_pad, dtype=torch.bool, device=m.device)
        if cond.padding_side == "left":
            feats.append(torch.cat([pad, body])), masks.append(torch.cat([invalid, valid]))
        else:
            feats.append(torch.cat([body, pad])), masks.append(torch.cat([valid, invalid]))
    return PromptBatch(torch.stack(feats), torch.stack(masks), cond.padding_side)


def weighted_cross_entropy(logits: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean CE over tokens; with `weights` (N,) or (B, N), sum(w * ce) / sum(w) (ARBooth's scale-wise loss
    plugs in here as a per-token weight map)."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1), reduction="none")
    ce = ce.view(tokens.shape)
    if weights is None:
        return ce.mean()
    w = weights.to(ce).expand_as(ce)
    return (ce * w).sum() / w.sum()


class ARStudent(nn.Module, ABC):
    """An autoregressive text-to-image model plus its image tokenizer and text encoder."""

    image_size: int
    tokenizer: object  # a transformers tokenizer; identifier tokens are added to it
    frozen: tuple[str, ...] = ()  # submodules that never train (see `freeze`)

    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> discrete codes (B, N)."""

    @abstractmethod
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Codes (B, N) -> images in [-1, 1]."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> PromptBatch:
        """Prompts -> the condition the transformer reads. Differentiable w.r.t. the text embedding table when
        grad is enabled (identifier tokens are learned through it); callers caching features use no_grad."""

    @abstractmethod
    def logits(self, cond: PromptBatch, tokens: torch.Tensor, cond_dropout: float = 0.0) -> torch.Tensor:
        """Teacher-forced logits (B, N, V) predicting each of `tokens` (B, N) given `cond` and the tokens before
        it. With probability `cond_dropout` a row's condition is replaced by the unconditional one (CFG)."""

    def loss(
        self,
        cond: PromptBatch,
        tokens: torch.Tensor,
        cond_dropout: float = 0.0,
        token_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token cross-entropy of `tokens` given `cond`, optionally weighted per token."""
        return weighted_cross_entropy(self.logits(cond, tokens, cond_dropout), tokens, token_weights)

    @abstractmethod
    def sample_tokens(self, cond: PromptBatch, cfg_scale: float = 4.0, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, seed: int = 0, use_cache: bool = True) -> torch.Tensor:
        """Image tokens for `cond` with classifier-free guidance (one batched forward per step for conditional and
        unconditional rows); deterministic for a seed, identical with and without cache. A family may add knobs
        (`autocast`) or use its release's defaults."""

    def generate(self, prompts: list[str], **sampling) -> torch.Tensor:
        """Sample images for a batch of `prompts`; `sampling` is passed to `sample_tokens`."""
        with torch.no_grad():
            cond = self.encode_prompts(prompts)
        return self.generate_from(cond, **sampling)

    def generate_from(self, cond: PromptBatch, **sampling) -> torch.Tensor:
        """Like `generate`, from an already-built condition (learned prefixes, cached features)."""
        return self.decode_tokens(self.sample_tokens(cond, **sampling))

    @property
    @abstractmethod
    def text_embedding(self) -> nn.Embedding:
        """The input embedding table that prompt token ids index (where identifier tokens get their rows)."""

    @abstractmethod
    def set_text_embedding(self, embedding: nn.Embedding) -> None:
        """Install a resized table (after tokens were added to `tokenizer`)."""

    @abstractmethod
    def parameter_groups(self) -> dict[str, list[str]]:
        """Names from `self.named_parameters()` per group. Every family provides these keys (empty where the
        architecture has none): 'text_embedding', 'attn_qkv', 'attn_out', 'cross_attn', 'mlp', 'norms',
        'output', plus 'layer.<i>' for each transformer layer."""

    def group_parameters(self, rules: dict[str, str], layer: str | None = None,
                         skip: str | None = None) -> dict[str, list[str]]:
        """`parameter_groups` from regexes: each parameter name not matching `skip` joins every group whose pattern
        it contains, and 'layer.<i>' for the number `layer` captures in it. 'cross_attn' stays empty unless a rule
        fills it. Searching (not matching) keeps peft-wrapped names in their groups."""
        groups: dict[str, list[str]] = {k: [] for k in rules}
        groups.setdefault("cross_attn", [])
        for name, _ in self.named_parameters():
            if skip and re.search(skip, name):
                continue
            for group, pattern in rules.items():
                if re.search(pattern, name):
                    groups[group].append(name)
            if layer and (m := re.search(layer, name)):
                groups.setdefault(f"layer.{m.group(1)}", []).append(name)
        return groups

    @abstractmethod
    def lora_target_modules(self) -> list[str]:
        """Module name suffixes peft's LoRA should wrap by default."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def freeze(self, *names: str) -> None:
        """Mark the submodules (dotted names) that never train, such as the image tokenizer and text encoder: they
        lose their grads, and stay in eval mode whenever the student trains. Leaves the student in eval mode."""
        self.frozen = names
        for name in names:
            self.get_submodule(name).requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> ARStudent:
        super().train(mode)
        for name in self.frozen:
            self.get_submodule(name).eval()
        return self

    def scale_token_weights(self, early_scales: int = 8, early: float = 1.0, late: float = 0.5) -> torch.Tensor | None:
        """Per-token loss weights (N,) for ARBooth's scale-wise loss: `early` on the tokens of the first
        `early_scales` scales, `late` after. Next-scale families override; raster ones have no scales (None)."""
        return None

    def enable_gradient_checkpointing(self) -> None:
        """Trade compute for activation memory in training. Default: every transformers model inside."""
        found = [m for m in self.modules() if hasattr(m, "gradient_checkpointing_enable")]
        if not found:
            raise NotImplementedError(f"{type(self).__name__} has no gradient checkpointing")
        for m in found:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def add_identifier_tokens(self, words: list[str], init_from: str | None = None) -> list[int]:
        """Add `words` as single new tokens (those already present are reused) and give new rows the mean
        embedding of `init_from`'s tokens (or of the whole table). Returns their ids in `words` order."""
        new = [w for w in words if w not in self.tokenizer.get_vocab()]
        # tokenised before the new words exist, so `init_from` can mention them ("dog" for a new "dog")
        src = self.tokenizer(init_from, add_special_tokens=False)["input_ids"] if init_from else None
        if new:
            self.tokenizer.add_tokens(new)
        ids = self.tokenizer.convert_tokens_to_ids(words)
        old = self.text_embedding
        if max(ids) >= old.num_embeddings:
            table = nn.Embedding(max(ids) + 1, old.embedding_dim, padding_idx=old.padding_idx,
                                 device=old.weight.device, dtype=old.weight.dtype)
            with torch.no_grad():
                table.weight[: old.num_embeddings] = old.weight
                if src:
                    init = old.weight[torch.tensor(src, device=old.weight.device)].mean(0)
                else:
                    init = old.weight.mean(0)
                table.weight[old.num_embeddings:] = init
            table.weight.requires_grad_(old.weight.requires_grad)
            self.set_text_embedding(table)
        return ids

    def module_names(self, groups: list[str], every_nth_layer: int = 1) -> list[str]:
        """Full names of the modules owning the parameters in `groups`, limited to every n-th layer (layer 0,
        n, 2n, ...); for LoRA targets such as Sun et al.'s Q/K/V on every 1st/2nd/4th layer."""
        table = self.parameter_groups()
        layer_of = {name: int(k.split(".")[1]) for k, names in table.items() if k.startswith("layer.")
                    for name in names}
        out = []
        for group in groups:
            for name in table[group]:
                layer = layer_of.get(name)
                if layer is not None and layer % every_nth_layer:
                    continue
                module = re.sub(r"\.(weight|bias)$", "", name)
                if module not in out:
                    out.append(module)
        return out


class T5Student(ARStudent):
    """A family that reads prompts through a frozen T5 encoder, `text_encoder`, saved with its tokenizer in one
    `save_pretrained` folder (LlamaGen, Infinity); identifier tokens get rows of T5's input embedding table."""

    text_encoder: nn.Module

    def attach_text_encoder(self, text_encoder: nn.Module, tokenizer, width: int) -> None:
        """Keep the encoder and its tokenizer (right-padding: `encode_prompts` places the valid tokens itself),
        checking the encoder is as wide as the features the transformer reads."""
        if text_encoder.config.d_model != width:
            raise ValueError(f"text encoder width {text_encoder.config.d_model} != {width}")
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.tokenizer.padding_side = "right"

    @staticmethod
    def load_text_encoder(folder) -> tuple[nn.Module, object]:
        """(T5EncoderModel, tokenizer) from a local `save_pretrained` folder."""
        from transformers import AutoTokenizer, T5EncoderModel

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return T5EncoderModel.from_pretrained(folder, local_files_only=True), tokenizer

    @classmethod
    def from_params(cls, student: dict) -> T5Student:
        """`student` keys: checkpoint, vq_checkpoint (weights files), text_encoder (folder), size, vq_size,
        image_size; passed to the family's `from_paths`."""
        from ar_models import require_file

        return cls.from_paths(
            checkpoint=require_file(student, "checkpoint"), vq_checkpoint=require_file(student, "vq_checkpoint"),
            text_encoder=require_file(student, "text_encoder", folder=True), size=student["size"],
            vq_size=student["vq_size"], image_size=int(student["image_size"]),
        )

    @property
    def text_embedding(self) -> nn.Embedding:
        return self.text_encoder.get_input_embeddings()

    def set_text_embedding(self, embedding: nn.Embedding) -> None:
        self.text_encoder.set_input_embeddings(embedding)
        self.text_encoder.config.vocab_size = embedding.num_embeddings

"""Janus-Pro text-to-image student (Chen et al. 2025, "Janus-Pro: Unified Multimodal Understanding and
Generation with Data and Model Scaling"), run through transformers' Janus port.

In image-generation mode Janus is a Llama decoder reading the chat-formatted prompt (ending in the image start
tag) as token embeddings, then VQ codes embedded by `generation_embeddings` -> `generation_aligner`; the
`generation_head` (not the text `lm_head`) predicts the next code. Checkpoints are transformers `save_pretrained`
folders as published at deepseek-community/Janus-Pro-1B / -7B (model + processor/tokenizer), loaded with
`from_pretrained` and checked strictly, so random-init replicas saved the same way go through the same path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ar_models.base import ARStudent, PromptBatch
from ar_models.llamagen import VQ_SIZES, VQConfig
from ar_models.loading import fail_on, pick, quiet_transformers
from ar_models.sampling import sample_guided

# -----------------------------------------------------------------------------
# Named sizes


@dataclass(frozen=True)
class JanusSize:
    """The architecture numbers of a Janus-Pro release (text: Llama decoder; vision: SigLIP understanding
    encoder; vq: LlamaGen's VQ-16 image tokenizer, which Janus generates with)."""

    dim: int = 2048
    n_layer: int = 24
    n_head: int = 16
    ffn_dim: int = 5632
    vocab_size: int = 102400
    max_positions: int = 16384
    vision_dim: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    image_size: int = 384
    vq: VQConfig = VQ_SIZES["VQ-16"]

    @property
    def downsample(self) -> int:
        return self.vq.downsample

    def config(self, tokenizer=None, image_size: int | None = None):
        """A `JanusConfig` of this size; with `tokenizer`, its vocabulary and special-token ids."""
        from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

        image_size = image_size or self.image_size
        ids = {}
        if tokenizer is not None:
            ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        text = LlamaConfig(**{
            "vocab_size": self.vocab_size, "hidden_size": self.dim, "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layer, "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_head, "max_position_embeddings": self.max_positions, **ids,
        })
        # Janus derives the VQ grid from the understanding encoder's patch grid: patch size = VQ downsampling.
        vision = JanusVisionConfig(
            hidden_size=self.vision_dim, num_hidden_layers=self.vision_layers, num_attention_heads=self.vision_heads,
            image_size=image_size, patch_size=self.downsample, projection_dim=self.dim,
            num_image_tokens=(image_size // self.downsample) ** 2,
        )
        vq = JanusVQVAEConfig(
            embed_dim=self.vq.codebook_embed_dim, num_embeddings=self.vq.codebook_size, latent_channels=self.vq.z_channels,
            base_channels=self.vq.ch, channel_multiplier=list(self.vq.ch_mult), num_res_blocks=self.vq.num_res_blocks,
            projection_dim=self.dim, image_token_embed_dim=self.dim,
        )
        image_token = tokenizer.convert_tokens_to_ids(tokenizer.image_token) if tokenizer is not None else 100581
        return JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=image_token,
                           tie_word_embeddings=False)


SIZES: dict[str, JanusSize] = {
    "tiny": JanusSize(dim=64, n_layer=2, n_head=4, ffn_dim=128, vocab_size=512, max_positions=512, vision_dim=32,
                      vision_layers=1, vision_heads=2, image_size=32,
                      vq=VQConfig(codebook_size=256, ch=32, ch_mult=(1, 1, 2, 2), z_channels=32, num_res_blocks=1)),
    "1B": JanusSize(),  # deepseek-ai/Janus-Pro-1B
    "7B": JanusSize(dim=4096, n_layer=30, n_head=32, ffn_dim=11008),  # deepseek-ai/Janus-Pro-7B
}


# -----------------------------------------------------------------------------
# Loading


def load_janus(folder: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """A Janus `save_pretrained` folder -> (JanusForConditionalGeneration in eval mode, JanusProcessor).

    ValueError naming the folder and the tensors on any missing, unexpected or mis-shaped weight
    (transformers alone would re-initialise missing ones with a warning)."""
    from transformers import JanusForConditionalGeneration, JanusProcessor

    with quiet_transformers():
        model, info = JanusForConditionalGeneration.from_pretrained(
            folder, dtype=dtype, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True,
        )
        processor = JanusProcessor.from_pretrained(folder, local_files_only=True)
    fail_on(folder, "JanusForConditionalGeneration", {
        "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
        "mis-shaped": [f"{k} {tuple(a)} != {tuple(b)}" for k, a, b in sorted(info["mismatched_keys"])],
        "errors": list(info["error_msgs"]),
    })
    return model.eval(), processor


def l2_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, h, w) -> codes (B, h*w) of the nearest codebook rows (V, C) after l2-normalising both."""
    z = F.normalize(z.flatten(2).transpose(1, 2).float(), dim=-1)
    return (z @ F.normalize(codebook.float(), dim=-1).T).argmax(-1)


# -----------------------------------------------------------------------------
# Student


class JanusProStudent(ARStudent):
    """A transformers Janus model in image-generation mode behind the `ARStudent` interface. The language model
    and the generation embeddings/aligner/head train; the VQ, the understanding encoder and `lm_head` are frozen."""

    def __init__(self, model, processor, image_size: int):
        super().__init__()
        vq = model.model.vqmodel
        grid = vq.quantize.quant_state_dims[0]
        downsample = 2 ** (len(vq.config.channel_multiplier) - 1)
        if grid * downsample != image_size:
            raise ValueError(f"image_size {image_size}: the checkpoint's VQ makes {grid * downsample}px images "
                             f"({grid}x{grid} codes, downsampling {downsample})")
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # as Janus's processor: real tokens end at the image start tag
        self.image_size = image_size
        self.num_image_tokens = grid * grid
        ids = self.tokenizer.convert_tokens_to_ids([self.tokenizer.bos_token, self.tokenizer.boi_token,
                                                    self.tokenizer.pad_token])
        self.bos_id, self.boi_id, self.pad_id = ids
        self.freeze("model.model.vqmodel", "model.model.vision_model", "model.model.aligner", "model.lm_head")

    @classmethod
    def from_paths(cls, checkpoint: str | os.PathLike, size: str = "tiny", image_size: int = 32,
                   dtype: str = "float32") -> JanusProStudent:
        """Load a Janus `save_pretrained` folder, checking it is the architecture `size` names."""
        expected = pick(SIZES, size, "Janus-Pro")
        if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r} (e.g. float32, bfloat16)")
        model, processor = load_janus(checkpoint, getattr(torch, dtype))
        text, vq = model.config.text_config, model.config.vq_config
        found = {"hidden_size": (text.hidden_size, expected.dim), "num_hidden_layers": (text.num_hidden_layers,
                 expected.n_layer), "num_attention_heads": (text.num_attention_heads, expected.n_head),
                 "intermediate_size": (text.intermediate_size, expected.ffn_dim),
                 "vq num_embeddings": (vq.num_embeddings, expected.vq.codebook_size)}
        wrong = [f"{k} {a} != {b}" for k, (a, b) in found.items() if a != b]
        if wrong:
            raise ValueError(f"{checkpoint}: config.json is not Janus-Pro size {size!r} ({', '.join(wrong)})")
        return cls(model, processor, image_size)

    @classmethod
    def from_params(cls, student: dict) -> JanusProStudent:
        """`student` keys: checkpoint (a Janus save_pretrained folder), size, image_size, optional dtype."""
        from ar_models import require_file

        return cls.from_paths(checkpoint=require_file(student, "checkpoint", folder=True), size=student["size"],
                              image_size=int(student["image_size"]), dtype=student.get("dtype", "float32"))

    @property
    def device(self) -> torch.device:
        return self.model.model.generation_embeddings.weight.device

    @property
    def text_embedding(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_text_embedding(self, embedding: nn.Embedding) -> None:
        self.model.set_input_embeddings(embedding)
        self.model.config.text_config.vocab_size = embedding.num_embeddings

    # -- images <-> codes

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Nearest l2-normalised codebook entry per latent, as Janus's VQ (codebook_l2_norm=True) quantises;
        transformers' `JanusVQVAE.encode` compares unnormalised vectors, so we do the lookup here."""
        vq = self.model.model.vqmodel
        z = vq.quant_conv(vq.encoder(images.to(self.device, vq.quant_conv.weight.dtype)))
        return l2_codes(z, vq.quantize.embedding.weight)

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.model.vqmodel.decode(tokens.to(self.device)).float().clamp(-1, 1)

    # -- condition

    def prompt_ids(self, prompts: list[str]):
        """Janus's generation prompt: the chat template ("<|User|>: {prompt}\\n\\n<|Assistant|>:") plus the image
        start tag, tokenized with BOS and left-padded by the processor."""
        texts = [self.processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": p}]}],
                                                    add_generation_prompt=True, tokenize=False) for p in prompts]
        return self.processor(text=texts, generation_mode="image", padding=True, return_tensors="pt")

    def encode_prompts(self, prompts: list[str]) -> PromptBatch:
        """Input embeddings of the prompt tokens (padded slots zero and masked out)."""
        batch = self.prompt_ids(prompts).to(self.device)
        mask = batch.attention_mask.bool()
        feats = self.text_embedding(batch.input_ids) * mask[..., None]
        return PromptBatch(features=feats, mask=mask, padding_side="left")

    def unconditional(self, cond: PromptBatch) -> PromptBatch:
        """Janus's unconditional prompt for `cond`: same real length, first token BOS, last the image start tag,
        everything between the pad token (its generate pads all but BOS and BOI)."""
        mask = cond.mask.to(self.device)
        B, L = mask.shape
        ids = torch.full((B, L), self.pad_id, dtype=torch.long, device=self.device)
        rows = torch.arange(B, device=self.device)
        first = mask.int().argmax(1)
        last = L - 1 - mask.flip(1).int().argmax(1)
        ids[rows, first] = self.bos_id
        ids[rows, last] = self.boi_id
        feats = self.text_embedding(ids) * mask[..., None]
        return PromptBatch(feats.to(cond.features.dtype), mask, cond.padding_side)

    # -- transformer

    def _hidden(self, embeds: torch.Tensor, mask: torch.Tensor, cache=None) -> torch.Tensor:
        """Last hidden states of the language model for `embeds` (B, T, D), the newest T positions of a sequence
        whose validity mask so far is `mask` (B, >= T). Positions count real tokens only, so a left-padded prompt
        sees the same positions as alone; with `cache`, earlier positions come from it."""
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)[:, -embeds.shape[1]:]
        out = self.model.model.language_model(
            inputs_embeds=embeds, attention_mask=mask.long(), position_ids=positions, past_key_values=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state

    def _image_embeds(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.prepare_embeddings_for_image_generation(tokens)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.model.generation_head(hidden).float()

    def logits(self, cond: PromptBatch, tokens: torch.Tensor, cond_dropout: float = 0.0) -> torch.Tensor:
        """Logits (B, N, codebook) for every image code. With probability cond_dropout a row's prompt becomes
        Janus's unconditional one (the pad-token prompt of its CFG)."""
        feats, mask = cond.features.to(self.device), cond.mask.to(self.device)
        if cond_dropout > 0:
            drop = torch.rand(feats.shape[0], device=self.device) < cond_dropout
            feats = torch.where(drop[:, None, None], self.unconditional(cond).features.to(feats.dtype), feats)
        tokens = tokens.to(self.device)
        L, N = feats.shape[1], tokens.shape[1]
        embeds = torch.cat([feats.to(self.text_embedding.weight.dtype), self._image_embeds(tokens[:, :-1])], dim=1)
        full = torch.cat([mask, mask.new_ones(mask.shape[0], N - 1)], dim=1)
        return self._head(self._hidden(embeds, full)[:, L - 1:])

    @torch.no_grad()
    def sample_tokens(self, cond: PromptBatch, cfg_scale: float = 4.0, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, seed: int = 0, use_cache: bool = True) -> torch.Tensor:
        """Image codes (B, N). Conditional and unconditional rows share one batched forward per step, guided as
        uncond + cfg_scale * (cond - uncond) (Janus); the prompt is run once and cached when use_cache."""
        from transformers import DynamicCache

        B, N = cond.features.shape[0], self.num_image_tokens
        guided = cfg_scale != 1.0
        if guided:
            uncond = self.unconditional(cond)
            cond = PromptBatch(torch.cat([cond.features, uncond.features.to(cond.features)]),
                               torch.cat([cond.mask, uncond.mask.to(cond.mask.device)]), cond.padding_side)
        prompt = cond.features.to(self.device, self.text_embedding.weight.dtype)
        mask = cond.mask.to(self.device)
        generator = torch.Generator(self.device).manual_seed(seed)
        cache = DynamicCache(config=self.model.config.text_config) if use_cache else None
        tokens = torch.empty(prompt.shape[0], 0, dtype=torch.long, device=self.device)
        hidden = self._hidden(prompt, mask, cache)[:, -1]
        for i in range(N):
            logits = self._head(hidden)
            nxt = sample_guided(logits, cfg_scale, temperature, top_k, top_p, generator)
            tokens = torch.cat([tokens, nxt.repeat(2 if guided else 1)[:, None]], dim=1)
            if i == N - 1:
                break
            full = torch.cat([mask, mask.new_ones(mask.shape[0], i + 1)], dim=1)
            if use_cache:
                hidden = self._hidden(self._image_embeds(tokens[:, -1:]), full, cache)[:, -1]
            else:
                hidden = self._hidden(torch.cat([prompt, self._image_embeds(tokens)], dim=1), full)[:, -1]
        return tokens[:B]

    # -- parameter selection

    def parameter_groups(self) -> dict[str, list[str]]:
        """Groups of `self.named_parameters()` names: the language model, its token table and the generation
        embeddings/aligner/head; the VQ, understanding encoder and text `lm_head` are never grouped. Matches
        peft-wrapped names too."""
        lm = r"\.language_model\."
        rules = {  # group -> regex over this family's parameter names
            "text_embedding": lm + r"embed_tokens\.",
            "attn_qkv": lm + r"layers\.\d+\.self_attn\.[qkv]_proj\.",
            "attn_out": lm + r"layers\.\d+\.self_attn\.o_proj\.",
            "mlp": lm + r"layers\.\d+\.mlp\.",
            "norms": lm + r"(layers\.\d+\.\w+_layernorm|norm)\.",
            "image_embeddings": r"\.generation_(embeddings|aligner)\.",
            "output": r"\.generation_head\.",
        }
        # no cross-attention: the prompt is a prefix of the sequence
        return self.group_parameters(rules, layer=lm + r"layers\.(\d+)\.")

    def lora_target_modules(self) -> list[str]:
        """The language model's attention and MLP projections, by full name: a bare `q_proj` suffix would also
        catch the understanding encoder's."""
        return self.module_names(["attn_qkv", "attn_out", "mlp"])

"""The small interface every AR student family implements.

Stages only talk to students through this, so adding a family never touches `tasks/`.
Images cross the interface as float tensors in [-1, 1], shape (B, 3, H, W).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PromptBatch:
    """Text condition for a batch: encoder features and their validity mask."""

    features: torch.Tensor  # (B, L, D)
    mask: torch.Tensor  # (B, L) bool, True where a real token is


class ARStudent(nn.Module, ABC):
    """An autoregressive text-to-image model plus its image tokenizer and text encoder."""

    image_size: int

    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> discrete codes (B, N)."""

    @abstractmethod
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Codes (B, N) -> images in [-1, 1]."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> PromptBatch:
        """Prompts -> the condition the transformer reads."""

    @abstractmethod
    def loss(self, cond: PromptBatch, tokens: torch.Tensor, cond_dropout: float = 0.0) -> torch.Tensor:
        """Mean next-token cross-entropy of `tokens` given `cond`."""

    @abstractmethod
    def generate(
        self,
        prompts: list[str],
        cfg_scale: float = 4.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> torch.Tensor:
        """Sample images for `prompts` with classifier-free guidance; deterministic for a seed."""

    @abstractmethod
    def parameter_groups(self) -> dict[str, list[str]]:
        """Named groups of trainable parameter names (e.g. 'attn_qkv', 'mlp', 'layer.3')."""

    @abstractmethod
    def lora_target_modules(self) -> list[str]:
        """Module name suffixes peft's LoRA should wrap by default."""

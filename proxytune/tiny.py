"""Tiny random-init stand-ins for the real models, saved in the real on-disk formats.

They let the whole pipeline run offline on a CPU through the same loaders real checkpoints use:
the supervisor is a genuine diffusers `StableDiffusionPipeline` folder (UNet, VAE, CLIP text encoder,
a CLIP BPE tokenizer trained here on the project's prompts), only narrow.
"""
from __future__ import annotations

from pathlib import Path

import torch

from proxytune.io import atomic_dir


def train_clip_tokenizer(corpus: list[str], vocab_size: int = 400):
    """A `CLIPTokenizer` (CLIP's byte-level BPE pipeline) with merges trained here on `corpus`."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    return CLIPTokenizer(model_max_length=77).train_new_from_iterator(
        corpus, vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )


def build_tiny_supervisor(out_dir: str | Path, corpus: list[str], seed: int = 0, image_size: int = 64) -> Path:
    """A StableDiffusionPipeline (SD1.5 family: UNet, eps-prediction) at toy width, saved with save_pretrained."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        tokenizer = train_clip_tokenizer(corpus)
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=image_size,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
        )
        unet = UNet2DConditionModel(
            sample_size=image_size // 4, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        )
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  num_train_timesteps=1000, clip_sample=False, steps_offset=1)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    return out_dir

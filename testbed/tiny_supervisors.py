"""Tiny random-init stand-ins for the diffusion supervisors, saved in the real on-disk formats.

They let the whole pipeline run offline on a CPU through the same loaders real checkpoints use: each
supervisor is a genuine diffusers pipeline folder (the same classes and state-dict key names as SD1.5/SD2,
SDXL, SD3 and FLUX.1) at toy widths, with tokenizers trained here on the project's prompts.
"""
from __future__ import annotations

from pathlib import Path

import torch

from proxytune.io import atomic_dir

FAMILIES = ("sd", "sd2", "sdxl", "sd3", "flux")


def _byte_alphabet() -> list[str]:
    """CLIP/GPT-2's printable stand-in for each of the 256 bytes, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def train_clip_tokenizer(corpus: list[str], num_merges: int = 150):
    """A `CLIPTokenizer` whose BPE merges are learned here on `corpus`, laid out as CLIP's vocab is (256 bytes,
    256 end-of-word bytes, the merges, then the two specials).

    Our own few-line trainer rather than `tokenizers`' BpeTrainer: that one breaks ties between equally frequent
    pairs in hash order, which differs per process, so the same corpus gave different ids (and the same seed
    different text-encoder weights) run to run. Here ties go to the smallest pair."""
    import re
    from collections import Counter

    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    words = Counter()
    for text in corpus:
        for word in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower()):
            symbols = [alphabet[b] for b in word.encode("utf-8")]
            words[tuple(symbols[:-1] + [symbols[-1] + "</w>"])] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged = {}
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *(a + b for a, b in merges)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def train_t5_tokenizer(corpus: list[str], vocab_size: int = 200, max_length: int = 32):
    """A `T5Tokenizer` (SentencePiece-style unigram with metaspace, `</s>` appended) trained on `corpus`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus, trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5Tokenizer(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                       extra_ids=0, model_max_length=max_length)


def _clip_text(tokenizer, with_projection: bool, hidden: int = 32, projection: int = 32, layers: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _t5_encoder(tokenizer, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    ))


def _vae(image_size: int, flow: bool, channels: tuple[int, ...] = (16, 32, 32)):
    """SD-style KL autoencoder, 4x downsampling; the flow families' VAE has a shift and no quant convs."""
    from diffusers import AutoencoderKL

    extra = dict(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False) \
        if flow else {}
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=image_size,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=channels, layers_per_block=1, norm_num_groups=8, **extra,
    )


def _ddpm(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         num_train_timesteps=1000, clip_sample=False, steps_offset=1, prediction_type=prediction_type)


# SD1.5-family widths: `tiny` for the random-init replicas, `world` for the supervisor pretrained on the world
# (a UNet of 6M parameters, a text tower wide enough to carry the captions, a VAE that reconstructs as well as
# the student's VQ).
SD_SIZES = {
    "tiny": dict(text_hidden=32, text_layers=2, unet=(32, 64), unet_layers=1, vae=(16, 32, 32)),
    "world": dict(text_hidden=64, text_layers=3, unet=(64, 128), unet_layers=2, vae=(32, 64, 64)),
}


def _sd(corpus, image_size, prediction_type="epsilon", size="tiny"):
    """SD1.5 (eps) or SD2 (v-prediction, linear projections in the transformer blocks)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    widths = SD_SIZES[size]
    tokenizer = train_clip_tokenizer(corpus)
    text_encoder = _clip_text(tokenizer, with_projection=False, hidden=widths["text_hidden"],
                              layers=widths["text_layers"])
    unet = UNet2DConditionModel(
        sample_size=image_size // 4, in_channels=4, out_channels=4, layers_per_block=widths["unet_layers"],
        block_out_channels=widths["unet"], norm_num_groups=8, cross_attention_dim=widths["text_hidden"],
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        use_linear_projection=prediction_type == "v_prediction",
    )
    return StableDiffusionPipeline(
        vae=_vae(image_size, flow=False, channels=widths["vae"]), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=unet, scheduler=_ddpm(prediction_type), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl(corpus, image_size):
    """Two CLIP encoders (hidden states concatenated, pooled projection of the second) and `text_time`
    micro-conditioning: 6 size/crop ids x 8 dims + 32 pooled dims feed the added embedding."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer, tokenizer_2 = train_clip_tokenizer(corpus), train_clip_tokenizer(corpus)
    unet = UNet2DConditionModel(
        sample_size=image_size // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=(2, 4), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
        transformer_layers_per_block=(1, 2), cross_attention_dim=64,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(image_size, flow=False), text_encoder=_clip_text(tokenizer, False), tokenizer=tokenizer,
        text_encoder_2=_clip_text(tokenizer_2, True), tokenizer_2=tokenizer_2, unet=unet, scheduler=_ddpm(),
    )


def _sd3(corpus, image_size):
    """MMDiT with CLIP-L + CLIP-G (hidden 32 each, concatenated to the 64-dim joint width) and no T5,
    which SD3 allows (`text_encoder_3=None` feeds zeros in its place)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2 = train_clip_tokenizer(corpus), train_clip_tokenizer(corpus)
    transformer = SD3Transformer2DModel(
        sample_size=image_size // 4, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
        pooled_projection_dim=64, pos_embed_max_size=32,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(image_size, True),
        text_encoder=_clip_text(tokenizer, True), tokenizer=tokenizer,
        text_encoder_2=_clip_text(tokenizer_2, True), tokenizer_2=tokenizer_2, text_encoder_3=None, tokenizer_3=None,
    )


def _flux(corpus, image_size):
    """FLUX.1-dev layout: CLIP pooled + T5 sequence, packed 2x2 latents, RoPE axes summing to the head dim,
    and the distilled-guidance embedding."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = train_clip_tokenizer(corpus), train_t5_tokenizer(corpus)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=_vae(image_size, True), text_encoder=_clip_text(tokenizer, False),
        tokenizer=tokenizer, text_encoder_2=_t5_encoder(tokenizer_2), tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def build_tiny_pipeline(family: str, out_dir: str | Path, corpus: list[str], seed: int = 0,
                        image_size: int = 64) -> Path:
    """A tiny `family` supervisor (one of FAMILIES) built with a fixed seed and saved with save_pretrained."""
    builders = {"sd": _sd, "sd2": lambda c, s: _sd(c, s, "v_prediction"), "sdxl": _sdxl, "sd3": _sd3, "flux": _flux}
    if family not in builders:
        raise ValueError(f"unknown tiny supervisor family {family!r} (known: {', '.join(FAMILIES)})")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        torch.manual_seed(seed)
        builders[family](corpus, image_size).save_pretrained(str(tmp), safe_serialization=True)
    return out_dir


def build_tiny_supervisor(out_dir: str | Path, corpus: list[str], seed: int = 0, image_size: int = 64,
                          size: str = "tiny") -> Path:
    """The embedded default supervisor: a StableDiffusionPipeline (SD1.5 family: UNet, eps-prediction) at one of
    SD_SIZES."""
    if size not in SD_SIZES:
        raise ValueError(f"unknown supervisor size {size!r} (known: {', '.join(SD_SIZES)})")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        torch.manual_seed(seed)
        _sd(corpus, image_size, size=size).save_pretrained(str(tmp), safe_serialization=True)
    return out_dir

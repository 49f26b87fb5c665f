"""Tiny random-init replicas of the AR student families, saved the way each release is.

They let the pipeline and the tests run offline on a CPU through the same loaders real checkpoints use. One
`build_tiny_<family>` per family; each returns the `student` params entries for what it wrote, and the same
seed always writes the same weights.
"""
from __future__ import annotations

import os
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ar_models import infinity, janus_pro, llamagen, lumina_mgpt, var
from ar_models.loading import pick, quiet_transformers
from proxytune.io import atomic_dir

# -----------------------------------------------------------------------------
# T5 stand-ins (LlamaGen, Infinity)


def tiny_t5_tokenizer(corpus: list[str], max_length: int):
    """A word-level tokenizer trained on `corpus` with T5's special ids (pad 0, </s> 1, unk 2) and `</s>`
    appended, standing in for flan-t5's SentencePiece model in the tiny replicas."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def tiny_t5_encoder(vocab_size: int, d_model: int):
    """A 2-layer T5EncoderModel of width `d_model` (random init from the current torch seed)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))


def _need_corpus(corpus: list[str]) -> None:
    if not corpus:
        raise ValueError("a tiny replica needs a non-empty corpus to train its tokenizer on")


# -----------------------------------------------------------------------------
# LlamaGen


def build_tiny_llamagen(out_dir: str | os.PathLike, corpus: list[str], seed: int = 0, image_size: int = 64,
                        size: str = "tiny", vq_size: str = "tiny") -> dict[str, Path]:
    """A LlamaGen at `size` / `vq_size` (small ones: tiny, world), saved as the releases are: t2i.pt and vq.pt
    ({"model": state_dict}) plus a text_encoder/ folder (tiny T5 + a word-level tokenizer trained on `corpus`).
    Returns kwargs for `LlamaGenStudent.from_paths`."""
    _need_corpus(corpus)
    gpt_config, vq_config = pick(llamagen.GPT_SIZES, size, "GPT"), pick(llamagen.VQ_SIZES, vq_size, "VQ")
    gpt_config = replace(gpt_config, block_size=(image_size // vq_config.downsample) ** 2)
    tokenizer = tiny_t5_tokenizer(corpus, gpt_config.cls_token_num)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        gpt, vq = llamagen.GPT(gpt_config), llamagen.VQModel(vq_config)
        encoder = tiny_t5_encoder(len(tokenizer), gpt_config.caption_dim)

    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        torch.save({"model": gpt.state_dict()}, tmp / "t2i.pt")
        torch.save({"model": vq.state_dict()}, tmp / "vq.pt")
        encoder.save_pretrained(tmp / "text_encoder")
        tokenizer.save_pretrained(tmp / "text_encoder")
    return {"checkpoint": out / "t2i.pt", "vq_checkpoint": out / "vq.pt", "text_encoder": out / "text_encoder"}


# -----------------------------------------------------------------------------
# Lumina-mGPT


def _chameleon_tokenizer(corpus: list[str], n_codes: int, max_grid: int):
    """A byte-level BPE tokenizer trained on `corpus` (+ the prompt template) whose vocabulary starts like
    Chameleon's: <s> <pad> </s> <unk>, the IMGIMG image tokens (ids 4..), then Lumina-mGPT's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    digits = "ABCDEFGHIJ"  # Chameleon spells code 123 as IMGIMGBCDZ
    images = [f"IMGIMG{''.join(digits[int(d)] for d in str(c))}Z" for c in range(n_codes)]
    specials = ["<s>", "<pad>", "</s>", "<unk>", *images, lumina_mgpt.IMAGE_END, lumina_mgpt.IMAGE_START,
                lumina_mgpt.END_OF_TURN, lumina_mgpt.END_OF_LINE, *(lumina_mgpt.size_token(n) for n in range(max_grid + 1))]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    template = lumina_mgpt.PROMPT_TEMPLATE.format(w=64, h=64, prompt="")
    trainer = trainers.BpeTrainer(vocab_size=len(specials) + 400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([template, *corpus], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_lumina_mgpt_components(corpus: list[str], seed: int = 0, image_size: int = 64):
    """The in-memory tiny decoder, VQGAN and tokenizer `build_tiny_lumina_mgpt` saves (same seed, same weights)."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    _need_corpus(corpus)
    size, vq_config = lumina_mgpt.DECODER_SIZES["tiny"], lumina_mgpt.VQ_SIZES["tiny"]
    tokenizer = _chameleon_tokenizer(corpus, vq_config.n_embed, max_grid=max(16, image_size // vq_config.downsample))
    vocab = tokenizer.get_vocab()
    config = ChameleonConfig(
        vocab_size=len(vocab), max_position_embeddings=1024, vocabulary_map=vocab, bos_token_id=vocab["<s>"],
        pad_token_id=vocab["<pad>"], eos_token_id=vocab["</s>"], tie_word_embeddings=False, **asdict(size),
        vq_config={"embed_dim": vq_config.embed_dim, "num_embeddings": vq_config.n_embed,
                   "latent_channels": vq_config.z_channels, "base_channels": vq_config.ch,
                   "channel_multiplier": list(vq_config.ch_mult), "num_res_blocks": vq_config.num_res_blocks,
                   "resolution": vq_config.resolution, "attn_resolutions": list(vq_config.attn_resolutions)},
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        decoder = ChameleonForConditionalGeneration(config)
        del decoder.model.vqmodel  # as Lumina-mGPT's finetune_solver: releases carry no VQ encoder
        vq = lumina_mgpt.VQGAN(vq_config)
    return decoder.eval(), vq.eval(), tokenizer


def build_tiny_lumina_mgpt(out_dir: str | os.PathLike, corpus: list[str], seed: int = 0, image_size: int = 64) -> dict:
    """A Lumina-mGPT at `tiny` size in the released layout: model/ (config.json, model.safetensors, tokenizer) as
    Lumina-mGPT-7B-768, vqgan.ckpt ({"state_dict": ...}) and vqgan.yaml as Meta's chameleon tokenizer folder."""
    decoder, vq, tokenizer = tiny_lumina_mgpt_components(corpus, seed, image_size)
    out = Path(out_dir)
    with atomic_dir(out) as tmp, quiet_transformers():
        decoder.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        torch.save({"state_dict": vq.state_dict()}, tmp / "vqgan.ckpt")
        lumina_mgpt.write_vq_config(tmp / "vqgan.yaml", vq.config)
    return {"checkpoint": out / "model", "vq_checkpoint": out / "vqgan.ckpt", "vq_config": out / "vqgan.yaml",
            "size": "tiny", "image_size": image_size}


# -----------------------------------------------------------------------------
# Janus-Pro

# The published processor's chat template (transformers' Janus conversion): "<|User|>: {prompt}\n\n<|Assistant|>:".
JANUS_CHAT_TEMPLATE = (
    "{%set seps=['\n\n','<\uff5cend\u2581of\u2581sentence\uff5c>']%}{%for message in messages%}"
    "{%if message['role']|lower=='user'%}<|User|>: "
    "{%elif message['role']|lower=='assistant'%}<|Assistant|>:{%if not (loop.last and not add_generation_prompt "
    "and message['content'][0]['type']=='text' and message['content'][0]['text']=='')%} {%endif%}"
    "{%else%}{{message['role'].capitalize()}}: {%endif%}"
    "{%for content in message['content']%}{%if content['type']=='image'%}{%if not loop.first%}{{'\n'}}{%endif%}"
    "<image_placeholder>{%if not loop.last%}{{'\n'}}{%endif%}{%elif content['type']=='text'%}"
    "{%set text=content['text']%}{%if loop.first%}{%set text=text.lstrip()%}{%endif%}"
    "{%if loop.last%}{%set text=text.rstrip()%}{%endif%}"
    "{%if not loop.first and message['content'][loop.index0-1]['type']=='text'%}{{' '+text}}{%else%}{{text}}"
    "{%endif%}{%endif%}{%endfor%}{%if not loop.last or add_generation_prompt%}"
    "{%if message['role']|lower=='user'%}{{seps[0]}}{%else%}{{seps[1]}}{%endif%}{%endif%}{%endfor%}"
    "{%if add_generation_prompt%}<|Assistant|>:{%endif%}"
)


def build_tiny_janus_pro(out_dir: str | os.PathLike, corpus: list[str], seed: int = 0, image_size: int = 32) -> dict:
    """A Janus-Pro at `tiny` size in the published layout: `save_pretrained` of the model and of a JanusProcessor
    whose byte-level BPE tokenizer is trained on `corpus` with Janus's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import JanusForConditionalGeneration, JanusImageProcessor, JanusProcessor, PreTrainedTokenizerFast

    _need_corpus(corpus)
    size = janus_pro.SIZES["tiny"]
    if image_size % size.downsample:
        raise ValueError(f"image_size {image_size} is not a multiple of the VQ downsampling {size.downsample}")
    # DeepSeek's spellings (fullwidth bars, U+2581 for spaces), as in the published tokenizer
    bos, eos, pad = ("<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>",
                     "<\uff5c\u2581pad\u2581\uff5c>")
    images = {"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"}
    specials = [bos, eos, pad, *images.values(), "<|User|>", "<|Assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=size.vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 0)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, additional_special_tokens=specials[3:],
        extra_special_tokens=images, model_max_length=size.max_positions,
    )
    grid = image_size // size.downsample
    processor = JanusProcessor(
        image_processor=JanusImageProcessor(size={"height": image_size, "width": image_size}), tokenizer=tokenizer,
        chat_template=JANUS_CHAT_TEMPLATE, use_default_system_prompt=True, num_image_tokens=grid * grid,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(size.config(tokenizer, image_size))

    out = Path(out_dir)
    with atomic_dir(out) as tmp, quiet_transformers():
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return {"checkpoint": out, "size": "tiny", "image_size": image_size}


# -----------------------------------------------------------------------------
# VAR


def build_tiny_var(out_dir: str | os.PathLike, corpus: list[str], seed: int = 0, image_size: int = 64,
                   size: str = "tiny", vq_size: str = "tiny") -> dict:
    """A VAR at `size` / `vq_size` (small ones: tiny, world), saved as the releases are: var_<size>.pth and
    vae_<vq_size>.pth (plain state dicts) plus a tokenizer/ folder whose classes are the corpus's distinct words
    (the world's VAR is given its class nouns). When the size's last scale times the VQVAE's downsampling is not
    image_size (tiny at other than 64²: multiples of 32), the scales are 1..image_size/downsampling."""
    words = sorted({w for line in corpus for w in line.lower().split()})
    if not words:
        raise ValueError("a tiny VAR needs a non-empty corpus to name the classes")
    config, vq_config = pick(var.VAR_SIZES, size, "VAR"), pick(var.VQ_SIZES, vq_size, "VQVAE")
    if image_size % (2 * vq_config.downsample):
        raise ValueError(f"image_size {image_size} is not a multiple of {2 * vq_config.downsample}")
    last = image_size // vq_config.downsample
    patch_nums = config.patch_nums if last == config.patch_nums[-1] else tuple(range(1, last + 1))
    config = replace(config, num_classes=len(words), patch_nums=patch_nums)
    tokenizer = var.class_tokenizer(words)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model, vae = var.VAR(config, vq_config.z_channels, vq_config.vocab_size), var.VQVAE(vq_config, patch_nums)
    out = Path(out_dir)
    checkpoint, vq_checkpoint = out / f"var_{size}.pth", out / f"vae_{vq_size}.pth"
    with atomic_dir(out) as tmp:
        torch.save(model.state_dict(), tmp / checkpoint.name)
        torch.save(vae.state_dict(), tmp / vq_checkpoint.name)
        tokenizer.save_pretrained(tmp / "tokenizer")
    return {"checkpoint": checkpoint, "vq_checkpoint": vq_checkpoint, "tokenizer": out / "tokenizer",
            "size": size, "vq_size": vq_size, "image_size": image_size, "patch_nums": list(patch_nums)}


# -----------------------------------------------------------------------------
# Infinity


def build_tiny_infinity(out_dir: str | os.PathLike, corpus: list[str], seed: int = 0,
                        image_size: int = 64) -> dict[str, Path]:
    """An Infinity at `tiny` size, saved as the release is: infinity_tiny.pth (a plain state dict, like
    infinity_2b_reg.pth), infinity_vae_tiny.pth ({"vae": state_dict}, bit mask under both of the release's
    quantizer names) and a text_encoder/ folder (tiny T5 + a word-level tokenizer trained on `corpus`)."""
    _need_corpus(corpus)
    config, vae_config = infinity.INFINITY_SIZES["tiny"], infinity.VAE_SIZES["tiny"]
    schedule = infinity.scale_schedule(image_size // vae_config.patch_size)
    tokenizer = tiny_t5_tokenizer(corpus, config.text_maxlen)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model, vae = infinity.Infinity(config, schedule), infinity.BSQVAE(vae_config)
        encoder = tiny_t5_encoder(len(tokenizer), config.text_channels)
    vae_state = vae.state_dict()
    for name in ("quantizer", "quantize"):
        vae_state[f"{name}.lfq.mask"] = vae.quantizer.lfq.mask.clone()

    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        torch.save(model.state_dict(), tmp / "infinity_tiny.pth")
        torch.save({"vae": vae_state}, tmp / "infinity_vae_tiny.pth")
        encoder.save_pretrained(tmp / "text_encoder")
        tokenizer.save_pretrained(tmp / "text_encoder")
    return {"checkpoint": out / "infinity_tiny.pth", "vq_checkpoint": out / "infinity_vae_tiny.pth",
            "text_encoder": out / "text_encoder"}

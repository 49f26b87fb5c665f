"""Pretraining the tiny base models on the procedural world, so their weights mean something.

Each function trains one tiny model from the same seeded initialisation `bootstrap` uses, on fresh world renders
every step (`testbed.world.WorldStream`: never an image twice, half the captions partial), for a fixed number of
steps, and writes it in the exact on-disk format the pipeline's loaders read (`metrics.DinoEmbedder` /
`ClipEmbedder`, `LlamaGenStudent.from_paths`, `diffusion.load_pipeline`), atomically. Same steps and seed give
the same weights on CPU. Each returns its loss history: one row per step ({"phase", "step", "loss"}) plus, per
phase, the loss on a fixed held-out batch (fixed noise, no augmentation) before and after training
({"phase": "<phase>/eval"}), which is the comparison that says the model learnt something: the per-step losses
are noisy.

Models train at the stream's image size (the size they are saved for) with AdamW, a short linear warm-up and a
cosine decay; nothing resumes: budgets are minutes.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from proxytune.io import atomic_dir, atomic_file
from proxytune.params import ProxytuneError
from testbed.world import WorldStream

# ------------------------------------------------------------------------------------------------- data

EVAL_STEP = -1  # the stream step of each phase's fixed evaluation batch: training steps count from 0


def _pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, S, S, 3) renders as float (B, 3, S, S) in [-1, 1] (the project's image convention)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _stream(seed: int, purpose: str, size: int) -> WorldStream:
    if not isinstance(size, int) or size < 16 or size % 8:
        raise ProxytuneError(f"world pretraining: image size must be a multiple of 8 of at least 16, got {size!r}")
    return WorldStream(seed, purpose, size)


def _augment(x: torch.Tensor, generator: torch.Generator, min_scale: float = 0.6) -> torch.Tensor:
    """Random horizontal flip and random resized crop (area min_scale..1), per image, back to the input size."""
    B, _, S, _ = x.shape
    out = []
    for i in range(B):
        side = round(S * math.sqrt(min_scale + (1 - min_scale) * float(torch.rand(1, generator=generator))))
        top, left = (int(v) for v in torch.randint(0, S - side + 1, (2,), generator=generator))
        crop = x[i:i + 1, :, top:top + side, left:left + side]
        crop = F.interpolate(crop, size=(S, S), mode="bilinear", align_corners=False, antialias=True)
        out.append(crop.flip(-1) if float(torch.rand(1, generator=generator)) < 0.5 else crop)
    return torch.cat(out)


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """[-1, 1] images -> (x01 - mean) / std, as the evaluators' preprocessors do."""
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return ((x + 1) / 2 - m) / s


def _train(phase: str, params, steps: int, lr: float, step_loss: Callable[[int], torch.Tensor],
           eval_loss: Callable[[], torch.Tensor], history: list[dict], autocast: bool, weight_decay: float = 0.01):
    """AdamW with a linear warm-up (10% of steps) and cosine decay; logs each step's loss and the fixed-batch
    loss before and after. `step_loss(i)` computes the loss of step i (its own batch and noise)."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / max(steps, 1))))
    amp = (lambda: torch.autocast("cpu", torch.bfloat16)) if autocast else nullcontext

    def evaluate(step):
        with torch.no_grad(), amp():
            history.append({"phase": f"{phase}/eval", "step": step, "loss": float(eval_loss())})

    evaluate(0)
    for i in range(steps):
        start = time.perf_counter()
        with amp():
            loss = step_loss(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        history.append({"phase": phase, "step": i + 1, "loss": loss.item(), "seconds": time.perf_counter() - start})
    evaluate(steps)


def _check_steps(**steps: int) -> None:
    for name, value in steps.items():
        if not isinstance(value, int) or value < 0:
            raise ProxytuneError(f"world pretraining: {name} must be a non-negative integer, got {value!r}")


def _corpus(seed: int, n: int = 2000) -> list[str]:
    """What the tiny tokenizers are trained on: the project's prompts (identifier included) and the full captions
    of `n` pretraining specs, which name every word a partial caption can use."""
    from proxytune.prompts import corpus_words
    from testbed.world import caption, pretraining_specs

    return corpus_words() + sorted({caption(s) for s in pretraining_specs(n, seed)})


def _contrastive_loss(img: torch.Tensor, txt: torch.Tensor, captions: list[str], logit_scale: torch.Tensor):
    """CLIP's symmetric InfoNCE on normalised embeddings, identical captions in a batch being positives of each
    other (partial captions such as "a box" repeat, and calling them negatives would teach the model to tell
    pixels apart that no caption does)."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    caption_id = torch.tensor([ids[c] for c in captions])
    logits = logit_scale.exp() * F.normalize(img.float(), dim=-1) @ F.normalize(txt.float(), dim=-1).T
    same = (caption_id[:, None] == caption_id[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# ------------------------------------------------------------------------------------------------- CLIP


def pretrain_clip(out_dir, steps: int, seed: int = 0, size: int = 32, batch_size: int = 32, lr: float = 1e-3,
                  autocast: bool = False) -> list[dict]:
    """The tiny open_clip model of `testbed.tiny_evaluators`, trained with CLIP's symmetric InfoNCE on
    (image, caption) pairs of its own stream. Writes out_dir/<TINY_CLIP_NAME>.json and open_clip_model.safetensors,
    i.e. `ClipEmbedder(TINY_CLIP_NAME, out_dir/open_clip_model.safetensors, config_dir=out_dir)`."""
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from safetensors.torch import save_file

    from testbed.tiny_evaluators import TINY_CLIP_NAME, tiny_clip_config

    _check_steps(steps=steps)
    stream = _stream(seed, "clip", size)
    config = tiny_clip_config(size)
    history: list[dict] = []
    with atomic_dir(out_dir) as tmp, torch.random.fork_rng(devices=[]):
        config_file = tmp / f"{TINY_CLIP_NAME}.json"
        config_file.write_text(json.dumps(config, indent=2))
        open_clip.add_model_config(config_file)  # the tokenizer the loader will use for this name
        tokenizer = open_clip.get_tokenizer(TINY_CLIP_NAME)
        torch.manual_seed(seed)
        model = open_clip.CLIP(**config)
        model.train()
        gen = torch.Generator().manual_seed(seed)

        def loss_of(step, augment):
            images, captions, _ = stream.batch(step, batch_size)
            x = _pixels(images)
            x = _augment(x, gen) if augment else x
            img = model.encode_image(_normalise(x, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))
            return _contrastive_loss(img, model.encode_text(tokenizer(captions)), captions, model.logit_scale)

        _train("clip", model.parameters(), steps, lr, lambda i: loss_of(i, True), lambda: loss_of(EVAL_STEP, False),
               history, autocast)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "open_clip_model.safetensors")
    return history


# ------------------------------------------------------------------------------------------------- DINO


def _attribute_labels(specs) -> dict[str, tuple[torch.Tensor, int]]:
    """Per attribute (class, colour and accent as drawn, pattern): each image's label and the number of labels."""
    from testbed.world import CLASSES, COLOURS, PATTERNS

    colours = list(COLOURS)
    return {
        "class": (torch.tensor([CLASSES.index(s.class_noun) for s in specs]), len(CLASSES)),
        "colour": (torch.tensor([colours.index(s.look()[0]) for s in specs]), len(colours)),
        "accent": (torch.tensor([len(colours) if s.look()[1] is None else colours.index(s.look()[1])
                                 for s in specs]), len(colours) + 1),  # the last: no accent (plain)
        "pattern": (torch.tensor([PATTERNS.index(s.pattern) for s in specs]), len(PATTERNS)),
    }


def pretrain_dino(out_dir, steps: int, seed: int = 0, size: int = 32, batch_size: int = 32, lr: float = 1e-3,
                  autocast: bool = False) -> list[dict]:
    """The tiny ViT of `testbed.tiny_evaluators` (DINO's stand-in), trained supervised: linear heads on the
    CLS token predict the object's class, colour, accent and pattern from augmented views (crop, flip). The heads
    are discarded; what is saved is the ViTModel folder + ViTImageProcessor config `DinoEmbedder` reads.

    Why supervised on the object's attributes: DreamBench's DINO score should measure *subject* identity, so the
    CLS embedding must separate instances (class x colour x pattern) and not scenes; linear heads per attribute
    also carry over to subjects whose combination pretraining never shows."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    from proxytune.metrics import IMAGENET_MEAN, IMAGENET_STD
    from testbed.world import CLASSES, COLOURS, PATTERNS

    _check_steps(steps=steps)
    stream = _stream(seed, "dino", size)
    n_labels = {"class": len(CLASSES), "colour": len(COLOURS), "accent": len(COLOURS) + 1, "pattern": len(PATTERNS)}
    history: list[dict] = []
    with atomic_dir(out_dir) as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same initialisation as tiny_evaluators
        config = ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=192,
                           image_size=size, patch_size=size // 4)
        model = ViTModel(config, add_pooling_layer=False)
        heads = torch.nn.ModuleDict({k: torch.nn.Linear(config.hidden_size, n) for k, n in n_labels.items()})
        model.train()
        gen = torch.Generator().manual_seed(seed)

        def loss_of(step, augment):
            images, _, specs = stream.batch(step, batch_size)
            labels = _attribute_labels(specs)
            x = _pixels(images)
            x = _augment(x, gen) if augment else x
            cls = model(pixel_values=_normalise(x, IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state[:, 0]
            return sum(F.cross_entropy(head(cls).float(), labels[k][0]) for k, head in heads.items())

        _train("dino", [*model.parameters(), *heads.parameters()], steps, lr, lambda i: loss_of(i, True),
               lambda: loss_of(EVAL_STEP, False), history, autocast)
        model.save_pretrained(tmp)
        ViTImageProcessor(size={"height": size, "width": size}, image_mean=IMAGENET_MEAN,
                          image_std=IMAGENET_STD).save_pretrained(tmp)
    return history


# ------------------------------------------------------------------------------------------------- LlamaGen


DEAD_AFTER = 8  # a code unused while this many codebooks' worth of latents went by is restarted


def _vq_loss(vq, x: torch.Tensor, beta: float = 0.25, idle: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """VQ-VAE loss with LlamaGen's l2-normalised codes: reconstruction + codebook + beta * commitment, with the
    straight-through estimator carrying the decoder's gradient to the encoder.

    In training, `idle` counts the latents quantised since each code was last used; codes idle for DEAD_AFTER x
    codebook size latents (a uniformly used code almost never is) move onto random latents of the batch
    (dead-code restart): without it the codebook collapses to a few dozen codes within 20 steps, as the
    encoder's latents drift away from the rest."""
    z = F.normalize(vq.quant_conv(vq.encoder(x)), dim=1)  # (B, C, H, W)
    with torch.no_grad():
        codes = vq.quantize.quantize(z)
        if idle is not None:
            idle += codes.numel()
            idle[codes.unique()] = 0
            dead = (idle >= DEAD_AFTER * len(idle)).nonzero().squeeze(1)
            latents = z.permute(0, 2, 3, 1).flatten(0, 2).float()
            vq.quantize.embedding.weight[dead] = latents[torch.randint(0, len(latents), (len(dead),),
                                                                       generator=generator)]
            idle[dead] = 0
    zq = vq.quantize.lookup(codes, z.shape[-1])
    recon = vq.decoder(vq.post_quant_conv(z + (zq - z).detach()))
    return F.mse_loss(recon, x) + F.mse_loss(zq, z.detach()) + beta * F.mse_loss(z, zq.detach())


@torch.no_grad()
def _init_codebook(vq, stream: WorldStream, generator: torch.Generator, batch_size: int = 64) -> None:
    """Codes start at the encoder's own (normalised) latents of random images, so every code is in use from the
    first step; a random codebook leaves most codes dead and the GPT with little to predict."""
    K = vq.quantize.embedding.num_embeddings
    latents, step = [], EVAL_STEP
    while sum(len(t) for t in latents) < K:
        step -= 1  # batches no training or evaluation step draws
        z = F.normalize(vq.quant_conv(vq.encoder(_pixels(stream.batch(step, batch_size)[0]))), dim=1)
        latents.append(z.permute(0, 2, 3, 1).flatten(0, 2))
    pool = torch.cat(latents)
    pick = torch.randperm(len(pool), generator=generator)[:K]
    vq.quantize.embedding.weight.copy_(pool[pick] + 1e-3 * torch.randn(K, pool.shape[1], generator=generator))


def pretrain_llamagen(out_dir, steps: int, vq_steps: int, seed: int = 0, size: int = 32, batch_size: int = 32,
                      lr: float = 1e-3, vq_lr: float = 1e-3, cond_dropout: float = 0.1,
                      autocast: bool = False, model_size: str = "tiny", vq_size: str = "tiny") -> list[dict]:
    """The tiny LlamaGen of `testbed.tiny_students.build_tiny_llamagen`: the VQ first trains as an autoencoder for
    `vq_steps` (0 keeps its random weights), then the GPT learns (caption, codes) pairs of fresh renders with
    `student.loss` (caption dropout 10%, so classifier-free guidance works). Writes t2i.pt / vq.pt
    ({"model": state_dict}) and the text_encoder/ folder: the T5 stays at its seeded random init (frozen in the
    pipeline too), its word-level tokenizer trained on the project's prompts plus the captions. History ends with
    a "vq/codes_used" row: the distinct codes of the GPT's evaluation batch."""
    from ar_models import llamagen
    from testbed.tiny_students import build_tiny_llamagen

    _check_steps(steps=steps, vq_steps=vq_steps)
    vq_stream, gpt_stream = _stream(seed, "vq", size), _stream(seed, "gpt", size)
    history: list[dict] = []
    with atomic_dir(out_dir) as tmp, torch.random.fork_rng(devices=[]):
        paths = build_tiny_llamagen(tmp / ".init", _corpus(seed), seed=seed, image_size=size, size=model_size,
                                    vq_size=vq_size)
        student = llamagen.LlamaGenStudent.from_paths(**paths, image_size=size, size=model_size, vq_size=vq_size)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)

        vq = student.vq
        if vq_steps:
            vq.requires_grad_(True).train()
            _init_codebook(vq, vq_stream, gen)
            idle = torch.zeros(vq.config.codebook_size, dtype=torch.long)
            _train("vq", vq.parameters(), vq_steps, vq_lr,
                   lambda i: _vq_loss(vq, _pixels(vq_stream.batch(i, batch_size)[0]), idle=idle, generator=gen),
                   lambda: _vq_loss(vq, _pixels(vq_stream.batch(EVAL_STEP, batch_size)[0])), history, autocast,
                   weight_decay=0.0)
            vq.requires_grad_(False).eval()
        student.train()
        used = set()

        def gpt_loss(step, dropout):
            images, captions, _ = gpt_stream.batch(step, batch_size)
            with torch.no_grad():  # the tokenizers are frozen: only the GPT learns
                codes = student.encode_images(_pixels(images))
                cond = student.encode_prompts(captions)
            if step == EVAL_STEP:
                used.update(codes.unique().tolist())
            return student.loss(cond, codes, cond_dropout=dropout)

        _train("gpt", student.gpt.parameters(), steps, lr, lambda i: gpt_loss(i, cond_dropout),
               lambda: gpt_loss(EVAL_STEP, 0.0), history, autocast, weight_decay=0.05)
        history.append({"phase": "vq/codes_used", "step": vq_steps, "loss": float(len(used))})
        torch.save({"model": student.gpt.state_dict()}, tmp / "t2i.pt")
        torch.save({"model": vq.state_dict()}, tmp / "vq.pt")
        os.replace(paths["text_encoder"], tmp / "text_encoder")
        shutil.rmtree(tmp / ".init")
    return history


# ------------------------------------------------------------------------------------------------- VAR


def _msvq_loss(vae, x: torch.Tensor, beta: float = 0.25, idle: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """VAR's VQVAE loss: reconstruction + the mean over scales of the codebook and beta * commitment terms on the
    running f_hat, with the straight-through estimator carrying the decoder's gradient to the encoder. Each
    scale quantises the residual its predecessors left, in fp32 as VAR does.

    In training, dead codes restart as in `_vq_loss`, onto random residuals of the batch (of every scale, the
    vectors codes stand for)."""
    quant = vae.quantize
    f = vae.quant_conv(vae.encoder(x))
    with torch.autocast(x.device.type, enabled=False):
        f = f.float()
        B, C, S = f.shape[0], f.shape[1], len(quant.patch_nums)
        f_rest, f_hat, vq_loss, codes, rests = f.detach(), quant.zeros(B, f), 0.0, [], []
        for si, pn in enumerate(quant.patch_nums):
            z = f_rest if si == S - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")
            rests.append(z.permute(0, 2, 3, 1).reshape(-1, C))
            codes.append(quant.nearest(rests[-1]))
            h = quant.contribution(si, codes[-1].view(B, pn * pn))
            f_hat, f_rest = f_hat + h, f_rest - h.detach()
            vq_loss = vq_loss + F.mse_loss(f_hat, f.detach()) + beta * F.mse_loss(f_hat.detach(), f)
        if idle is not None:
            with torch.no_grad():
                used = torch.cat(codes)
                idle += used.numel()
                idle[used.unique()] = 0
                dead = (idle >= DEAD_AFTER * len(idle)).nonzero().squeeze(1)
                pool = torch.cat(rests)
                quant.embedding.weight[dead] = pool[torch.randint(0, len(pool), (len(dead),), generator=generator)]
                idle[dead] = 0
    recon = vae.decoder(vae.post_quant_conv(f + (f_hat - f).detach()))
    return F.mse_loss(recon.float(), x) + vq_loss / S


def pretrain_var(out_dir, steps: int, vq_steps: int, seed: int = 0, size: int = 32, batch_size: int = 32,
                 lr: float = 1e-3, vq_lr: float = 1e-3, cond_dropout: float = 0.1, autocast: bool = False,
                 model_size: str = "tiny", vq_size: str = "tiny") -> list[dict]:
    """The VAR of `testbed.tiny_students.build_tiny_var` with the world's class nouns as its classes: the
    multi-scale VQVAE first trains as an autoencoder for `vq_steps` (0 keeps its random weights; every code starts
    idle, so the first step moves the unused ones onto the data), then the transformer learns next-scale
    prediction of fresh renders' codes with `student.loss`, conditioned as the student reads the captions (their
    class noun; class dropout 10%, so classifier-free guidance works). Writes var_<model_size>.pth and
    vae_<vq_size>.pth (plain state dicts, as VAR's releases) and the tokenizer/ folder. History ends with a
    "var_vq/codes_used" row: the distinct codes of the transformer's evaluation batch."""
    from ar_models import var
    from testbed.tiny_students import build_tiny_var
    from testbed.world import CLASSES

    _check_steps(steps=steps, vq_steps=vq_steps)
    vq_stream, var_stream = _stream(seed, "var_vq", size), _stream(seed, "var", size)
    history: list[dict] = []
    with atomic_dir(out_dir) as tmp, torch.random.fork_rng(devices=[]):
        paths = build_tiny_var(tmp / ".init", list(CLASSES), seed=seed, image_size=size, size=model_size,
                               vq_size=vq_size)
        student = var.VARStudent.from_params(paths)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)

        vae = student.vae
        if vq_steps:
            vae.requires_grad_(True).train()
            K = vae.config.vocab_size
            idle = torch.full((K,), DEAD_AFTER * K, dtype=torch.long)
            _train("var_vq", vae.parameters(), vq_steps, vq_lr,
                   lambda i: _msvq_loss(vae, _pixels(vq_stream.batch(i, batch_size)[0]), idle=idle, generator=gen),
                   lambda: _msvq_loss(vae, _pixels(vq_stream.batch(EVAL_STEP, batch_size)[0])), history, autocast,
                   weight_decay=0.0)
            vae.requires_grad_(False).eval()
        student.train()
        used = set()

        def var_loss(step, dropout):
            images, captions, _ = var_stream.batch(step, batch_size)
            codes = student.encode_images(_pixels(images))  # the VQVAE is frozen: only the transformer learns
            if step == EVAL_STEP:
                used.update(codes.unique().tolist())
            return student.loss(student.encode_prompts(captions), codes, cond_dropout=dropout)

        _train("var", student.var.parameters(), steps, lr, lambda i: var_loss(i, cond_dropout),
               lambda: var_loss(EVAL_STEP, 0.0), history, autocast, weight_decay=0.05)
        history.append({"phase": "var_vq/codes_used", "step": vq_steps, "loss": float(len(used))})
        torch.save(student.var.state_dict(), tmp / paths["checkpoint"].name)
        torch.save(vae.state_dict(), tmp / paths["vq_checkpoint"].name)
        os.replace(paths["tokenizer"], tmp / "tokenizer")
        shutil.rmtree(tmp / ".init")
    return history


# ------------------------------------------------------------------------------------------------- supervisor


def _train_text_encoder(text_encoder, tokenizer, stream: WorldStream, steps: int, lr: float, batch_size: int,
                        seed: int, history: list[dict], autocast: bool) -> None:
    """Train the supervisor's CLIP text tower contrastively against a small vision tower (CLIP's recipe, on the
    world's captions), in place; the vision tower is discarded. Real SD conditions on a pretrained CLIP text
    encoder: a random one lowers the UNet's noise error by a few percent only, so the supervisor ignored prompts."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    text_config = text_encoder.config
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=stream.size, patch_size=stream.size // 4)
    clip = CLIPModel(CLIPConfig(text_config=text_config.to_dict(), vision_config=vision.to_dict(),
                                projection_dim=text_config.hidden_size))
    tower = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 dropped the wrapper
    clip.text_model.load_state_dict(tower.state_dict())  # start from the seeded init
    clip.train()
    gen = torch.Generator().manual_seed(seed)

    def loss_of(step, augment):
        images, captions, _ = stream.batch(step, batch_size)
        x = _pixels(images)
        x = _augment(x, gen) if augment else x
        ids = tokenizer(captions, padding=True, return_tensors="pt").input_ids
        out = clip(input_ids=ids, pixel_values=_normalise(x, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))
        return _contrastive_loss(out.image_embeds, out.text_embeds, captions, clip.logit_scale)

    _train("text", clip.parameters(), steps, lr, lambda i: loss_of(i, True), lambda: loss_of(EVAL_STEP, False),
           history, autocast)
    tower.load_state_dict(clip.text_model.state_dict())


def _vae_loss(vae, x: torch.Tensor, generator: torch.Generator, kl_weight: float = 1e-4) -> torch.Tensor:
    """Reconstruction (MSE) + a small KL to N(0, I), as SD's KL autoencoder (without its GAN and LPIPS terms)."""
    dist = vae.encode(x).latent_dist
    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)
    return F.mse_loss(vae.decode(z).sample, x) + kl_weight * dist.kl().mean() / z[0].numel()


def pretrain_supervisor(out_dir, steps: int, vae_steps: int, text_steps: int, seed: int = 0, size: int = 32,
                        batch_size: int = 32, lr: float = 1e-3, vae_lr: float = 1e-3, text_lr: float = 1e-3,
                        cond_dropout: float = 0.1, autocast: bool = False, model_size: str = "tiny") -> list[dict]:
    """The SD1.5-family pipeline of `testbed.tiny_supervisors.build_tiny_supervisor` at `model_size`, trained as
    SD was: its CLIP text encoder contrastively on captions (`text_steps`, its own stream, apart from the evaluator
    CLIP's, so the evaluator cannot be gamed; then frozen), the VAE as a KL autoencoder (`vae_steps`), its
    `scaling_factor` set so the world's latents have unit variance (as SD's 0.18215 was chosen), then the UNet on
    epsilon-prediction with the captions through the frozen text encoder (caption dropout 10% for guidance).
    0 steps keep a part at its random init. Saved with save_pretrained."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from testbed.tiny_supervisors import build_tiny_supervisor

    _check_steps(steps=steps, vae_steps=vae_steps, text_steps=text_steps)
    streams = {phase: _stream(seed, f"supervisor-{phase}", size) for phase in ("text", "vae", "unet")}
    history: list[dict] = []
    with atomic_dir(out_dir) as tmp, tempfile.TemporaryDirectory() as scratch, torch.random.fork_rng(devices=[]):
        init = build_tiny_supervisor(Path(scratch) / "init", _corpus(seed), seed=seed, image_size=size,
                                     size=model_size)
        pipe = StableDiffusionPipeline.from_pretrained(init, safety_checker=None, requires_safety_checker=False)
        for part in (pipe, pipe.vae, pipe.unet):  # not the scratch folder, which differs run to run
            part.register_to_config(_name_or_path="testbed.world_pretrain")
        vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)

        if text_steps:
            _train_text_encoder(text_encoder, tokenizer, streams["text"], text_steps, text_lr, batch_size, seed,
                                history, autocast)
        text_encoder.requires_grad_(False).eval()

        if vae_steps:
            vae.train()
            vae_stream = streams["vae"]
            _train("vae", vae.parameters(), vae_steps, vae_lr,
                   lambda i: _vae_loss(vae, _pixels(vae_stream.batch(i, batch_size)[0]), gen),
                   lambda: _vae_loss(vae, _pixels(vae_stream.batch(EVAL_STEP, batch_size)[0]),
                                     torch.Generator().manual_seed(seed)),  # the same noise before and after
                   history, autocast, weight_decay=0.0)
        vae.requires_grad_(False).eval()

        unet_stream = streams["unet"]
        with torch.no_grad():
            means = [vae.encode(_pixels(unet_stream.batch(-2 - i, 64)[0])).latent_dist.mean for i in range(4)]
            vae.register_to_config(scaling_factor=float(1 / torch.cat(means).std()))
            empty = text_encoder(tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                                           return_tensors="pt").input_ids)[0]
        scale = vae.config.scaling_factor
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        T = scheduler.config.num_train_timesteps
        unet.train()

        def eps_loss(step, g, dropout):
            images, captions, _ = unet_stream.batch(step, batch_size)
            with torch.no_grad():
                latents = vae.encode(_pixels(images)).latent_dist.sample(g) * scale
                ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids
                cond = text_encoder(ids)[0]
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(0, T, (len(captions),), generator=g)
            if dropout:
                cond = torch.where((torch.rand(len(captions), generator=g) < dropout)[:, None, None], empty, cond)
            pred = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=cond).sample
            return F.mse_loss(pred.float(), noise)

        _train("unet", unet.parameters(), steps, lr, lambda i: eps_loss(i, gen, cond_dropout),
               lambda: eps_loss(EVAL_STEP, torch.Generator().manual_seed(seed), 0.0), history, autocast)
        unet.eval()
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    return history


# ------------------------------------------------------------------------------------------------- the driver

# The shipped models/world weights: fixed step counts (not a time budget, so the same seed gives the same
# weights on any machine) at batch 32 of 32 px renders.
PLAN = {"image_size": 32, "batch_size": 32, "clip": 1500, "dino": 3000, "vq": 1500, "gpt": 3000,
        "text": 1500, "vae": 1500, "unet": 2400, "var_vq": 800, "var": 1500}
# Each group runs in its own process with one torch thread, so the two cores train two groups at once; the
# longest groups start first.
GROUPS = {"supervisor": ("text", "vae", "unet"), "llamagen": ("vq", "gpt"), "var": ("var_vq", "var"),
          "evaluators": ("clip", "dino")}


def store_half(root) -> list[Path]:
    """Rewrite every weight file under `root` with its float tensors in fp16, so models/world stays small in git.
    Every loader copies into fp32 parameters (`load_state_dict`, diffusers' and transformers' default dtypes), so
    the models run as before, from weights rounded once; returns the files it rewrote."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    def half(value):
        if isinstance(value, torch.Tensor):
            return value.half() if value.is_floating_point() else value
        return {k: half(v) for k, v in value.items()} if isinstance(value, dict) else value

    done = []
    for path in sorted(Path(root).rglob("*")):
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as f:
                metadata = f.metadata()
            state = half(load_file(path))
            with atomic_file(path) as tmp:
                save_file(state, tmp, metadata=metadata)
        elif path.suffix in (".pt", ".pth"):
            state = half(torch.load(path, map_location="cpu", weights_only=True))
            with atomic_file(path) as tmp:
                torch.save(state, tmp)
        else:
            continue
        done.append(path)
    return done


def pretrain_group(group: str, out_dir, plan: dict, seed: int = 0) -> list[dict]:
    """Train one GROUPS entry into out_dir/<group> (the layout params.yaml points at)."""
    out, common = Path(out_dir), dict(seed=seed, size=plan["image_size"], batch_size=plan["batch_size"],
                                      autocast=True)
    if group == "llamagen":
        return pretrain_llamagen(out / "llamagen", plan["gpt"], plan["vq"], model_size="world", vq_size="world",
                                 **common)
    if group == "supervisor":
        return pretrain_supervisor(out / "supervisor", plan["unet"], plan["vae"], plan["text"], model_size="world",
                                   **common)
    if group == "var":
        return pretrain_var(out / "var", plan["var"], plan["var_vq"], model_size="world", vq_size="world", **common)
    if group == "evaluators":
        return (pretrain_clip(out / "evaluators" / "clip", plan["clip"], **common)
                + pretrain_dino(out / "evaluators" / "dino", plan["dino"], **common))
    raise ProxytuneError(f"world pretraining: group {group!r} is not one of {tuple(GROUPS)}")


def main(argv: list[str] | None = None) -> None:
    """`python -m testbed.world_pretrain --out models/world`: train the groups in parallel worker processes (two
    by default, one per core); each group's loss history goes to out/history/<group>.jsonl, the seconds it took
    to out/history/seconds.json."""
    import argparse
    import subprocess
    import sys

    from proxytune.io import write_jsonl

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", default="models/world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--group", choices=GROUPS, help="train only this group (what each worker process runs)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.group:
        torch.set_num_threads(1)
        start = time.perf_counter()
        history = pretrain_group(args.group, out, PLAN, args.seed)
        (out / "history").mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "history" / f"{args.group}.jsonl", history)
        print(f"{args.group}: {time.perf_counter() - start:.0f} s", flush=True)
        return
    start, queue, running, failed = time.perf_counter(), list(GROUPS), {}, []
    while queue or running:
        while queue and len(running) < max(1, args.workers):
            group = queue.pop(0)
            running[group] = subprocess.Popen([sys.executable, "-m", "testbed.world_pretrain", "--out", str(out),
                                               "--seed", str(args.seed), "--group", group])
        time.sleep(1)
        for group, worker in list(running.items()):
            if worker.poll() is not None:
                del running[group]
                if worker.returncode:
                    failed.append(f"{group} (exit code {worker.returncode})")
    if failed:
        raise SystemExit(f"world pretraining failed: {', '.join(failed)}")
    store_half(out)
    (out / "plan.json").write_text(json.dumps({"seed": args.seed, **PLAN, "storage": "fp16"}, indent=2) + "\n")
    print(f"world pretraining: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()

"""Pretraining the tiny base models on the procedural world, so their weights mean something.

Each function reads a dataset folder written by `testbed.world.write_dataset` (captions.jsonl + images), trains
one tiny model from the same seeded initialisation `bootstrap` uses, for a fixed number of steps, and writes it in
the exact on-disk format the pipeline's loaders read (`metrics.DinoEmbedder` / `ClipEmbedder`,
`LlamaGenStudent.from_paths`, `diffusion.load_pipeline`), atomically. Same dataset, steps and seed give the same
weights on CPU. Each returns its loss history: one row per step ({"phase", "step", "loss"}) plus, per phase, the
loss on a fixed batch (fixed noise, no augmentation) before and after training ({"phase": "<phase>/eval"}), which
is the comparison that says the model learnt something: the per-step losses are noisy.

Models train at the dataset's image size (the size they are saved for) with AdamW, a short linear warm-up and a
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from proxytune.io import atomic_dir, read_jsonl
from proxytune.params import ProxytuneError

# ------------------------------------------------------------------------------------------------- data


@dataclass
class WorldData:
    """A world dataset in memory: images as uint8 (N, 3, S, S), captions and the rows of captions.jsonl."""

    images: torch.Tensor
    captions: list[str]
    rows: list[dict]

    @property
    def size(self) -> int:
        return self.images.shape[-1]

    def pixels(self, idx: torch.Tensor) -> torch.Tensor:
        """Images `idx` as float in [-1, 1] (the project's image convention)."""
        return self.images[idx].float() / 127.5 - 1


def load_world(dataset: str | os.PathLike) -> WorldData:
    """Read a `world.write_dataset` folder; a one-line ProxytuneError names the file when it is not one."""
    root = Path(dataset)
    index = root / "captions.jsonl"
    if not index.is_file():
        raise ProxytuneError(f"{index}: world dataset index not found (write it with testbed.world.write_dataset)")
    rows = read_jsonl(index)
    if not rows:
        raise ProxytuneError(f"{index}: world dataset is empty")
    arrays = []
    for row in rows:
        path = root / row["file"]
        if not path.is_file():
            raise ProxytuneError(f"{index}: image {row['file']!r} is missing")
        arrays.append(np.asarray(Image.open(path).convert("RGB")))
    if len({a.shape for a in arrays}) != 1 or arrays[0].shape[0] != arrays[0].shape[1]:
        raise ProxytuneError(f"{index}: images must all be the same square size")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return WorldData(images, [r["caption"] for r in rows], rows)


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless shuffled index batches (epochs of a seeded permutation); a batch never exceeds the dataset."""
    batch_size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i:i + batch_size]


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


def _corpus(data: WorldData) -> list[str]:
    """What the tiny tokenizers are trained on: the project's prompts (identifier included) and the captions."""
    from proxytune.prompts import corpus_words

    return corpus_words() + sorted(set(data.captions))


# ------------------------------------------------------------------------------------------------- CLIP


def pretrain_clip(dataset, out_dir, steps: int, seed: int = 0, batch_size: int = 32, lr: float = 1e-3,
                  autocast: bool = False) -> list[dict]:
    """The tiny open_clip model of `testbed.tiny_evaluators`, trained with CLIP's symmetric InfoNCE on
    (image, caption) pairs. Writes out_dir/<TINY_CLIP_NAME>.json and open_clip_model.safetensors, i.e.
    `ClipEmbedder(TINY_CLIP_NAME, out_dir/open_clip_model.safetensors, config_dir=out_dir)`.

    Identical captions in a batch are treated as positives of each other (the world repeats captions, and
    calling them negatives would teach the model to tell pixels apart that no caption does)."""
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from safetensors.torch import save_file

    from testbed.tiny_evaluators import TINY_CLIP_NAME, tiny_clip_config

    _check_steps(steps=steps)
    data = load_world(dataset)
    config = tiny_clip_config(data.size)
    history: list[dict] = []
    with atomic_dir(out_dir) as tmp, torch.random.fork_rng(devices=[]):
        config_file = tmp / f"{TINY_CLIP_NAME}.json"
        config_file.write_text(json.dumps(config, indent=2))
        open_clip.add_model_config(config_file)  # the tokenizer the loader will use for this name
        tokenizer = open_clip.get_tokenizer(TINY_CLIP_NAME)
        torch.manual_seed(seed)
        model = open_clip.CLIP(**config)
        model.train()
        tokens = tokenizer(data.captions)
        first = {c: i for i, c in reversed(list(enumerate(data.captions)))}
        caption_id = torch.tensor([first[c] for c in data.captions])
        gen = torch.Generator().manual_seed(seed)
        batches = _batches(len(data.captions), batch_size, gen)

        def loss_of(idx, augment):
            x = data.pixels(idx)
            x = _augment(x, gen) if augment else x
            img = F.normalize(model.encode_image(_normalise(x, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)), dim=-1)
            txt = F.normalize(model.encode_text(tokens[idx]), dim=-1)
            logits = model.logit_scale.exp() * img.float() @ txt.float().T
            same = (caption_id[idx][:, None] == caption_id[idx][None, :]).float()
            target = same / same.sum(1, keepdim=True)
            return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

        fixed = torch.arange(min(batch_size, len(data.captions)))
        _train("clip", model.parameters(), steps, lr, lambda i: loss_of(next(batches), True),
               lambda: loss_of(fixed, False), history, autocast)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "open_clip_model.safetensors")
    return history


# ------------------------------------------------------------------------------------------------- DINO


def _attribute_labels(data: WorldData) -> dict[str, tuple[torch.Tensor, int]]:
    """Per attribute (class, colour and accent as drawn, pattern): each image's label and the number of labels."""
    from testbed.world import CLASSES, COLOURS, PATTERNS, Spec

    fields = ("class_noun", "colour", "pattern", "accent", "scene", "accessory", "property")
    specs = [Spec(**{k: r[k] for k in fields}) for r in data.rows]
    colours = list(COLOURS)
    return {
        "class": (torch.tensor([CLASSES.index(s.class_noun) for s in specs]), len(CLASSES)),
        "colour": (torch.tensor([colours.index(s.look()[0]) for s in specs]), len(colours)),
        "accent": (torch.tensor([len(colours) if s.look()[1] is None else colours.index(s.look()[1])
                                 for s in specs]), len(colours) + 1),  # the last: no accent (plain)
        "pattern": (torch.tensor([PATTERNS.index(s.pattern) for s in specs]), len(PATTERNS)),
    }


def pretrain_dino(dataset, out_dir, steps: int, seed: int = 0, batch_size: int = 32, lr: float = 1e-3,
                  autocast: bool = False) -> list[dict]:
    """The tiny ViT of `testbed.tiny_evaluators` (DINO's stand-in), trained supervised: linear heads on the
    CLS token predict the object's class, colour, accent and pattern from augmented views (crop, flip). The heads
    are discarded; what is saved is the ViTModel folder + ViTImageProcessor config `DinoEmbedder` reads.

    Why supervised on the object's attributes: DreamBench's DINO score should measure *subject* identity, so the
    CLS embedding must separate instances (class x colour x pattern) and not scenes; linear heads per attribute
    also carry over to subjects whose combination pretraining never shows."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    from proxytune.metrics import IMAGENET_MEAN, IMAGENET_STD

    _check_steps(steps=steps)
    data = load_world(dataset)
    labels = _attribute_labels(data)
    history: list[dict] = []
    with atomic_dir(out_dir) as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same initialisation as tiny_evaluators
        config = ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=192,
                           image_size=data.size, patch_size=data.size // 4)
        model = ViTModel(config, add_pooling_layer=False)
        heads = torch.nn.ModuleDict({k: torch.nn.Linear(config.hidden_size, n) for k, (_, n) in labels.items()})
        model.train()
        gen = torch.Generator().manual_seed(seed)
        batches = _batches(len(data.rows), batch_size, gen)

        def loss_of(idx, augment):
            x = data.pixels(idx)
            x = _augment(x, gen) if augment else x
            cls = model(pixel_values=_normalise(x, IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state[:, 0]
            return sum(F.cross_entropy(head(cls).float(), labels[k][0][idx]) for k, head in heads.items())

        fixed = torch.arange(min(batch_size, len(data.rows)))
        _train("dino", [*model.parameters(), *heads.parameters()], steps, lr, lambda i: loss_of(next(batches), True),
               lambda: loss_of(fixed, False), history, autocast)
        model.save_pretrained(tmp)
        ViTImageProcessor(size={"height": data.size, "width": data.size}, image_mean=IMAGENET_MEAN,
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
def _init_codebook(vq, data: WorldData, generator: torch.Generator, batch_size: int = 64) -> None:
    """Codes start at the encoder's own (normalised) latents of random images, so every code is in use from the
    first step; a random codebook leaves most codes dead and the GPT with little to predict."""
    K = vq.quantize.embedding.num_embeddings
    latents = []
    for idx in torch.randperm(len(data.rows), generator=generator).split(batch_size):
        z = F.normalize(vq.quant_conv(vq.encoder(data.pixels(idx))), dim=1)
        latents.append(z.permute(0, 2, 3, 1).flatten(0, 2))
        if sum(len(t) for t in latents) >= K:
            break
    pool = torch.cat(latents)
    pick = torch.randint(0, len(pool), (K,), generator=generator) if len(pool) < K else \
        torch.randperm(len(pool), generator=generator)[:K]
    vq.quantize.embedding.weight.copy_(pool[pick] + 1e-3 * torch.randn(K, pool.shape[1], generator=generator))


def pretrain_llamagen(dataset, out_dir, steps: int, vq_steps: int, seed: int = 0, batch_size: int = 32,
                      lr: float = 1e-3, vq_lr: float = 1e-3, cond_dropout: float = 0.1,
                      autocast: bool = False, size: str = "tiny", vq_size: str = "tiny") -> list[dict]:
    """The tiny LlamaGen of `testbed.tiny_students.build_tiny_llamagen`: the VQ first trains as an autoencoder for `vq_steps`
    (0 keeps its random weights), then the GPT learns the world's (caption, codes) pairs with `student.loss`
    (caption dropout 10%, so classifier-free guidance works). Writes t2i.pt / vq.pt ({"model": state_dict}) and
    the text_encoder/ folder: the T5 stays at its seeded random init (frozen in the pipeline too), its word-level
    tokenizer trained on the project's prompts plus the captions. History ends with a "vq/codes_used" row."""
    from ar_models import llamagen
    from testbed.tiny_students import build_tiny_llamagen

    _check_steps(steps=steps, vq_steps=vq_steps)
    data = load_world(dataset)
    history: list[dict] = []
    with atomic_dir(out_dir) as tmp, torch.random.fork_rng(devices=[]):
        paths = build_tiny_llamagen(tmp / ".init", _corpus(data), seed=seed, image_size=data.size, size=size,
                                    vq_size=vq_size)
        student = llamagen.LlamaGenStudent.from_paths(**paths, image_size=data.size, size=size, vq_size=vq_size)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        fixed = torch.arange(min(batch_size, len(data.rows)))

        vq = student.vq
        if vq_steps:
            vq.requires_grad_(True).train()
            _init_codebook(vq, data, gen)
            batches = _batches(len(data.rows), batch_size, gen)
            idle = torch.zeros(vq.config.codebook_size, dtype=torch.long)
            _train("vq", vq.parameters(), vq_steps, vq_lr,
                   lambda i: _vq_loss(vq, data.pixels(next(batches)), idle=idle, generator=gen),
                   lambda: _vq_loss(vq, data.pixels(fixed)), history, autocast, weight_decay=0.0)
            vq.requires_grad_(False).eval()

        with torch.no_grad():
            codes = torch.cat([student.encode_images(data.pixels(idx)) for idx in torch.arange(len(data.rows))
                               .split(64)])
            cond = student.encode_prompts(data.captions)
        student.train()
        batches = _batches(len(data.rows), batch_size, gen)

        def gpt_loss(idx, dropout):
            return student.loss(cond[idx], codes[idx], cond_dropout=dropout)

        _train("gpt", student.gpt.parameters(), steps, lr, lambda i: gpt_loss(next(batches), cond_dropout),
               lambda: gpt_loss(fixed, 0.0), history, autocast, weight_decay=0.05)
        history.append({"phase": "vq/codes_used", "step": vq_steps, "loss": float(codes.unique().numel())})
        torch.save({"model": student.gpt.state_dict()}, tmp / "t2i.pt")
        torch.save({"model": vq.state_dict()}, tmp / "vq.pt")
        os.replace(paths["text_encoder"], tmp / "text_encoder")
        shutil.rmtree(tmp / ".init")
    return history


# ------------------------------------------------------------------------------------------------- supervisor


def _vae_loss(vae, x: torch.Tensor, generator: torch.Generator, kl_weight: float = 1e-4) -> torch.Tensor:
    """Reconstruction (MSE) + a small KL to N(0, I), as SD's KL autoencoder (without its GAN and LPIPS terms)."""
    dist = vae.encode(x).latent_dist
    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)
    return F.mse_loss(vae.decode(z).sample, x) + kl_weight * dist.kl().mean() / z[0].numel()


def pretrain_supervisor(dataset, out_dir, steps: int, vae_steps: int, seed: int = 0, batch_size: int = 32,
                        lr: float = 1e-3, vae_lr: float = 1e-3, cond_dropout: float = 0.1,
                        autocast: bool = False) -> list[dict]:
    """The tiny SD1.5-family pipeline of `testbed.tiny_supervisors.build_tiny_supervisor`: the VAE first trains as a KL
    autoencoder for `vae_steps` (0 keeps it random), its `scaling_factor` is then set so the world's latents have
    unit variance (as SD's 0.18215 was chosen), and the UNet learns epsilon-prediction on those latents with the
    captions through the frozen CLIP text encoder (caption dropout 10% for guidance). Saved with save_pretrained."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from testbed.tiny_supervisors import build_tiny_supervisor

    _check_steps(steps=steps, vae_steps=vae_steps)
    data = load_world(dataset)
    history: list[dict] = []
    with atomic_dir(out_dir) as tmp, tempfile.TemporaryDirectory() as scratch, torch.random.fork_rng(devices=[]):
        init = build_tiny_supervisor(Path(scratch) / "init", _corpus(data), seed=seed, image_size=data.size)
        pipe = StableDiffusionPipeline.from_pretrained(init, safety_checker=None, requires_safety_checker=False)
        for part in (pipe, pipe.vae, pipe.unet):  # not the scratch folder, which differs run to run
            part.register_to_config(_name_or_path="testbed.world_pretrain")
        vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        fixed = torch.arange(min(batch_size, len(data.rows)))
        text_encoder.requires_grad_(False).eval()

        if vae_steps:
            vae.train()
            batches = _batches(len(data.rows), batch_size, gen)
            _train("vae", vae.parameters(), vae_steps, vae_lr,
                   lambda i: _vae_loss(vae, data.pixels(next(batches)), gen),
                   lambda: _vae_loss(vae, data.pixels(fixed), torch.Generator().manual_seed(seed)),  # same noise
                   history, autocast, weight_decay=0.0)
        vae.requires_grad_(False).eval()

        with torch.no_grad():
            dists = [vae.encode(data.pixels(idx)).latent_dist for idx in torch.arange(len(data.rows)).split(64)]
            mean, std = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
            vae.register_to_config(scaling_factor=float(1 / mean.std()))
            scale = vae.config.scaling_factor
            ids = tokenizer(data.captions + [""], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            text = text_encoder(ids)[0]
        text, empty = text[:-1], text[-1:]
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        T = scheduler.config.num_train_timesteps
        unet.train()

        def eps_loss(idx, g, dropout):
            latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(0, T, (len(idx),), generator=g)
            cond = text[idx]
            if dropout:
                cond = torch.where((torch.rand(len(idx), generator=g) < dropout)[:, None, None], empty, cond)
            pred = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=cond).sample
            return F.mse_loss(pred.float(), noise)

        batches = _batches(len(data.rows), batch_size, gen)
        _train("unet", unet.parameters(), steps, lr, lambda i: eps_loss(next(batches), gen, cond_dropout),
               lambda: eps_loss(fixed, torch.Generator().manual_seed(seed), 0.0), history, autocast)
        unet.eval()
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    return history


# ------------------------------------------------------------------------------------------------- the driver

# The shipped models/world weights: fixed step counts (not a time budget, so the same seed gives the same
# weights on any machine), sized to finish within 45 minutes on this 2-core CPU with the two groups in parallel
# (seconds per step at 32 px, batch 32, bf16 autocast, one thread: vq 0.43, gpt 0.49, vae 0.26, unet 0.73,
# clip 0.18, dino 0.05).
PLAN = {"images": 6000, "image_size": 32, "clip": 1500, "dino": 3000, "vq": 1500, "gpt": 3000,
        "vae": 800, "unet": 2400}
# Each group runs in its own process (one torch thread each), so the two cores train two models at once.
GROUPS = {"llamagen": ("vq", "gpt"), "supervisor": ("vae", "unet"), "evaluators": ("clip", "dino")}


def pretrain_group(group: str, dataset, out_dir, plan: dict, seed: int = 0) -> list[dict]:
    """Train one GROUPS entry on the dataset into out_dir/<group> (the layout params.yaml points at)."""
    out = Path(out_dir)
    if group == "llamagen":
        return pretrain_llamagen(dataset, out / "llamagen", plan["gpt"], plan["vq"], seed, autocast=True,
                                 size="world", vq_size="world")
    if group == "supervisor":
        return pretrain_supervisor(dataset, out / "supervisor", plan["unet"], plan["vae"], seed, autocast=True)
    if group == "evaluators":
        return (pretrain_clip(dataset, out / "evaluators" / "clip", plan["clip"], seed, autocast=True)
                + pretrain_dino(dataset, out / "evaluators" / "dino", plan["dino"], seed, autocast=True))
    raise ProxytuneError(f"world pretraining: group {group!r} is not one of {tuple(GROUPS)}")


def main(argv: list[str] | None = None) -> None:
    """`python -m testbed.world_pretrain --out models/world`: write the dataset, then train the groups in
    parallel processes; each group's loss history goes to out/history/<group>.jsonl."""
    import argparse
    import subprocess
    import sys

    from proxytune.io import write_jsonl
    from testbed.world import write_dataset

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", default="models/world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--group", choices=GROUPS, help="train only this group (what each worker process runs)")
    parser.add_argument("--dataset", help="an existing world dataset folder (default: write one into a temp dir)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.group:
        torch.set_num_threads(1)
        start = time.perf_counter()
        history = pretrain_group(args.group, args.dataset, out, PLAN, args.seed)
        (out / "history").mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "history" / f"{args.group}.jsonl", history)
        print(f"{args.group}: {time.perf_counter() - start:.0f} s")
        return
    with tempfile.TemporaryDirectory() as scratch:
        dataset = args.dataset or write_dataset(Path(scratch) / "world", PLAN["images"], args.seed,
                                                size=PLAN["image_size"])
        def spawn(group):
            return subprocess.Popen([sys.executable, "-m", "testbed.world_pretrain", "--out", str(out),
                                     "--seed", str(args.seed), "--group", group, "--dataset", str(dataset)])

        workers = [spawn("llamagen"), spawn("supervisor")]
        if workers[1].wait() == 0:  # the evaluators are cheap: they follow the supervisor on its core
            workers.append(spawn("evaluators"))
        codes = [w.wait() for w in workers]
    if any(codes):
        raise SystemExit(f"world pretraining failed (exit codes {codes})")
    (out / "plan.json").write_text(json.dumps({"seed": args.seed, **PLAN}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""DreamBench metrics (DINO, CLIP-I, CLIP-T) as the DreamBooth paper defines them.

- DINO:   mean pairwise cosine similarity between DINO ViT-S/16 CLS embeddings of
          generated and real images. Rewards subject fidelity (DINO is not trained to
          ignore appearance differences within a class, unlike CLIP).
- CLIP-I: the same pairwise mean with CLIP image embeddings.
- CLIP-T: mean cosine similarity between each generated image and its prompt (the
          prompt with the rare-token identifier removed, see `strip_identifier`).
- PRES:   (ARBooth) DINO score of generations from the bare class prompt against the subject's
          references: how far the subject leaked into the class (lower = less language drift).
- DIV:    (ARBooth) mean pairwise LPIPS distance between generations of one prompt (optional: needs
          the `lpips` package and a local backbone file, which cannot be downloaded here).

Everything loads from local files in the formats the real checkpoints are published in
(transformers `ViTModel` folder for `facebook/dino-vits16`, open_clip config + weights
for CLIP), so `testbed.tiny_evaluators` can stand in for them offline and in tests.
transformers / open_clip are imported lazily: importing this module stays cheap.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from functools import cached_property
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

from proxytune.io import atomic_file, read_or_heal, sha256_file, sha256_tree

IMAGENET_MEAN = [0.485, 0.456, 0.406]  # what facebook/dino-vits16's preprocessor_config ships
IMAGENET_STD = [0.229, 0.224, 0.225]
# Bump when preprocessing/embedding logic changes, so old cache entries stop matching.
_EMBED_VERSION = "1"


# --------------------------------------------------------------------------- helpers

def strip_identifier(prompt: str, identifier: str) -> str:
    """Remove the whole-word `identifier` (e.g. "sks") from `prompt` and collapse spaces.

    CLIP-T scores the prompt *without* the identifier: the rare token means nothing to CLIP
    and would only add noise. Occurrences inside other words are left alone.
    """
    if not identifier.strip():
        raise ValueError("identifier must be a non-empty token")
    out = re.sub(rf"(?<!\w){re.escape(identifier.strip())}(?!\w)", " ", prompt)
    return " ".join(out.split())


def image_sha256(image: Image.Image) -> str:
    """Content hash of an image: mode, size and pixels (not file bytes, so re-encoding a
    file does not matter, but any pixel change does)."""
    h = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def _as_rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    """Both encoders take 3-channel input; alpha is dropped, palettes are resolved."""
    return [im if im.mode == "RGB" else im.convert("RGB") for im in images]


# --------------------------------------------------------------------------- cache

def resize_policy(images: Sequence[Image.Image], size: int) -> list[Image.Image]:
    """`size` 0 keeps images as they are (each evaluator's own preprocessing resizes them); otherwise a
    centre square crop resized to size x size, so generated and real images are compared at one scale."""
    if size <= 0:
        return list(images)
    return [ImageOps.fit(im, (size, size), method=Image.Resampling.LANCZOS) for im in images]


class EmbeddingCache:
    """On-disk embedding store keyed by (model identity, image content sha256).

    Why: every evaluation re-embeds the same reference images and often unchanged
    generations; with the cache those cost a file read instead of a forward pass.
    One small safetensors file per embedding at `root/<model-hash>/<ab>/<image-sha>.safetensors`,
    written to a temp file and renamed, so an interrupted run never leaves a torn entry; an unreadable one
    (a disk fault) is deleted and counts as a miss.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.hits = 0  # lookups answered from disk / that needed a forward pass, since creation
        self.misses = 0

    def _path(self, model_id: str, key: str) -> Path:
        model_dir = hashlib.sha256(model_id.encode()).hexdigest()[:32]
        return self.root / model_dir / key[:2] / f"{key}.safetensors"

    def get(self, model_id: str, key: str) -> torch.Tensor | None:
        embedding = read_or_heal(self._path(model_id, key), lambda path: load_file(path)["embedding"])
        if embedding is None:
            self.misses += 1
        else:
            self.hits += 1
        return embedding

    def put(self, model_id: str, key: str, embedding: torch.Tensor) -> None:
        tensor = embedding.detach().to("cpu", torch.float32).contiguous().clone()
        with atomic_file(self._path(model_id, key)) as tmp:
            save_file({"embedding": tensor}, str(tmp), metadata={"model_id": model_id})


# --------------------------------------------------------------------------- embedders

class _ImageEmbedder:
    """Shared batching / normalisation / caching. Subclasses set `model`, `device` and
    implement `_forward` (a batch of RGB images -> raw features) and `_identity`."""

    model: torch.nn.Module
    device: torch.device
    cache: EmbeddingCache | None

    def _forward(self, images: list[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def _identity(self) -> str:
        raise NotImplementedError

    @cached_property
    def model_id(self) -> str:
        """Cache key part naming the exact model (hashes weight files, so computed lazily)."""
        return f"{type(self).__name__}:v{_EMBED_VERSION}:{self._identity()}"

    def _run(self, images: list[Image.Image], batch_size: int) -> torch.Tensor:
        from tqdm.auto import tqdm

        out = []
        batches = range(0, len(images), batch_size)
        with torch.inference_mode():
            for i in tqdm(batches, desc=f"embed {type(self).__name__[:-8]}", unit="batch", disable=None,
                          leave=False):
                feats = self._forward(images[i : i + batch_size])
                out.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out)

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """L2-normalised float32 embeddings, shape (N, D), on CPU; rows follow `images`."""
        if len(images) == 0:
            raise ValueError("embed_images needs at least one image")
        rgb = _as_rgb(images)
        if self.cache is None:
            return self._run(rgb, batch_size)
        keys = [image_sha256(im) for im in rgb]
        by_key = dict(zip(keys, rgb))  # also dedupes repeated images
        found = {k: e for k in by_key if (e := self.cache.get(self.model_id, k)) is not None}
        missing = [k for k in by_key if k not in found]
        if missing:
            for k, emb in zip(missing, self._run([by_key[k] for k in missing], batch_size)):
                self.cache.put(self.model_id, k, emb)
                found[k] = emb
        return torch.stack([found[k] for k in keys])


class DinoEmbedder(_ImageEmbedder):
    """DINO CLS-token embedder from a transformers `ViTModel` folder (`facebook/dino-vits16` format).

    Preprocessing is the folder's own `preprocessor_config.json` (for dino-vits16: bilinear
    resize to 224x224, ImageNet mean/std), applied with the PIL backend of
    `ViTImageProcessor`, matching the PIL-based `ViTFeatureExtractor` the checkpoint was
    published with.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu",
                 cache: EmbeddingCache | None = None):
        from transformers import ViTModel
        try:
            from transformers import ViTImageProcessorPil as Processor  # transformers >= 5
        except ImportError:
            from transformers import ViTImageProcessor as Processor

        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"DINO model folder not found: {self.path}")
        self.device = torch.device(device)
        self.cache = cache
        self.processor = Processor.from_pretrained(self.path)
        self.model = ViTModel.from_pretrained(self.path, add_pooling_layer=False, dtype=torch.float32)
        self.model.to(self.device).eval()

    def _identity(self) -> str:
        return sha256_tree(self.path)

    def _forward(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return self.model(pixel_values=pixels.to(self.device)).last_hidden_state[:, 0]


class ClipEmbedder(_ImageEmbedder):
    """open_clip image and text embedder.

    `pretrained` is a local weights file (.safetensors/.bin/.pt) or an open_clip pretrained
    tag. `config_dir` holds `<model_name>.json` for a custom architecture; it is registered
    with `open_clip.add_model_config` first (the latest registration of a name wins).

    OpenAI CLIP weights were trained with QuickGELU: load them as `ViT-B-32-quickgelu`
    (or pass `force_quick_gelu=True`). Plain `ViT-B-32` + OpenAI weights loads without
    error but produces wrong embeddings.
    """

    def __init__(self, model_name: str, pretrained: str | os.PathLike,
                 config_dir: str | os.PathLike | None = None, device: str = "cpu",
                 cache: EmbeddingCache | None = None, force_quick_gelu: bool = False):
        import open_clip

        if config_dir is not None:
            config_file = Path(config_dir) / f"{model_name}.json"
            if not config_file.is_file():
                raise FileNotFoundError(f"open_clip model config not found: {config_file}")
            open_clip.add_model_config(config_file)
        pretrained = str(pretrained)
        if os.path.isfile(pretrained):
            self._weights_id = lambda: "file:" + sha256_file(pretrained)
        elif open_clip.get_pretrained_cfg(model_name, pretrained):
            self._weights_id = lambda: "tag:" + pretrained
        else:
            raise FileNotFoundError(
                f"CLIP weights not found: {pretrained} (no such file, and not an open_clip "
                f"pretrained tag for {model_name})")
        self.model_name = model_name
        self.force_quick_gelu = force_quick_gelu
        self.device = torch.device(device)
        self.cache = cache
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=self.device, force_quick_gelu=force_quick_gelu)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self._config = open_clip.get_model_config(model_name)

    def _identity(self) -> str:
        spec = {"name": self.model_name, "config": self._config,
                "quick_gelu": self.force_quick_gelu, "weights": self._weights_id()}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def _forward(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        return self.model.encode_image(pixels)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised float32 text embeddings, shape (N, D), on CPU (not cached: cheap)."""
        if len(texts) == 0:
            raise ValueError("embed_texts needs at least one text")
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[i : i + batch_size])).to(self.device)
                out.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(out)


# --------------------------------------------------------------------------- scores

def pairwise_mean(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all rows of `a` x rows of `b` (both L2-normalised), in float64 so
    the result does not depend on the order of the rows."""
    return float((a.double() @ b.double().T).mean())


def prompt_scores(generated: Sequence[Image.Image], prompts: Sequence[str], references: Sequence[Image.Image],
                  dino: DinoEmbedder, clip: ClipEmbedder, lpips: LpipsDistance | None = None,
                  batch_size: int = 32) -> list[dict]:
    """One row per distinct prompt (first-seen order): prompt, images, dino, clip_i, clip_t, and div when
    `lpips` is given. `prompts[i]` belongs to `generated[i]` and has the identifier removed already.

    Each model embeds all images in one batched (and cached) call; rows then slice the embeddings, so the
    number of forward passes does not grow with the number of prompts."""
    if not generated or not references:
        raise ValueError("need at least one generated and one reference image")
    if len(prompts) != len(generated):
        raise ValueError(f"{len(prompts)} prompts for {len(generated)} generated images")
    gen_d, ref_d = dino.embed_images(generated, batch_size), dino.embed_images(references, batch_size)
    gen_c, ref_c = clip.embed_images(generated, batch_size), clip.embed_images(references, batch_size)
    unique = list(dict.fromkeys(prompts))
    text = clip.embed_texts(unique)
    rows = []
    for t, prompt in enumerate(unique):
        idx = [i for i, p in enumerate(prompts) if p == prompt]
        row = {"prompt": prompt, "images": len(idx), "dino": pairwise_mean(gen_d[idx], ref_d),
               "clip_i": pairwise_mean(gen_c[idx], ref_c), "clip_t": pairwise_mean(gen_c[idx], text[t : t + 1])}
        if lpips is not None:
            row["div"] = lpips.mean_pairwise([generated[i] for i in idx])
        rows.append(row)
    return rows


def clip_t(generated: Sequence[Image.Image], prompts: Sequence[str], clip: ClipEmbedder,
           batch_size: int = 32) -> float:
    """CLIP-T alone, for models drawn without a subject: mean over images of cos(image, its prompt)."""
    if not generated or len(prompts) != len(generated):
        raise ValueError(f"{len(prompts)} prompts for {len(generated)} generated images")
    unique = list(dict.fromkeys(prompts))
    text = clip.embed_texts(unique)[[unique.index(p) for p in prompts]]
    images = clip.embed_images(generated, batch_size)
    return float((images.double() * text.double()).sum(dim=1).mean())


def summarize(rows: Sequence[dict]) -> dict[str, float]:
    """Image-weighted means of per-prompt rows: equal to scoring all images at once (the papers' number)."""
    total = sum(r["images"] for r in rows)
    out = {}
    for key in ("dino", "clip_i", "clip_t"):
        out[key] = sum(r[key] * r["images"] for r in rows) / total
    divs = [r["div"] for r in rows if not math.isnan(r.get("div", math.nan))]  # NaN: a single image
    if divs:
        out["div"] = sum(divs) / len(divs)
    return out


def dreambench_scores(generated: Sequence[Image.Image], prompts: Sequence[str],
                      references: Sequence[Image.Image], dino: DinoEmbedder,
                      clip: ClipEmbedder) -> dict[str, float]:
    """DINO, CLIP-I (mean over all generated x reference pairs) and CLIP-T (mean over
    generated images of cos(image, its prompt)). `prompts[i]` belongs to `generated[i]`
    and should already have the identifier removed (`strip_identifier`)."""
    return summarize(prompt_scores(generated, prompts, references, dino, clip))


def pres_score(class_images: Sequence[Image.Image], references: Sequence[Image.Image], dino: DinoEmbedder,
               batch_size: int = 32) -> float:
    """ARBooth's PRES: DINO similarity of bare-class-prompt generations to the subject (lower is better)."""
    return pairwise_mean(dino.embed_images(class_images, batch_size), dino.embed_images(references, batch_size))


class LpipsDistance:
    """LPIPS v0.1 (the `lpips` package, whose linear heads ship inside it) on a backbone read from a local
    torchvision checkpoint (`alexnet-owt-7be5be79.pth` for net="alex", `vgg16-397923af.pth` for "vgg"):
    the package would otherwise download it. Only the checkpoint's `features.*` tensors are used."""

    def __init__(self, backbone: str | os.PathLike, net: str = "alex", device: str = "cpu"):
        import warnings

        import lpips

        self.backbone = Path(backbone)
        if not self.backbone.is_file():
            raise FileNotFoundError(f"LPIPS backbone weights not found: {self.backbone}")
        with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
            warnings.simplefilter("ignore")
            self.model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
        source = torch.load(self.backbone, map_location="cpu", weights_only=True)
        target = {}
        for key, param in self.model.net.state_dict().items():
            _, index, leaf = key.split(".", 2)  # slice<k>.<features index>.<weight|bias>
            src = f"features.{index}.{leaf}"
            if src not in source:
                raise ValueError(f"{self.backbone}: missing tensor {src} for LPIPS {net}")
            if source[src].shape != param.shape:
                raise ValueError(f"{self.backbone}: tensor {src} has shape {tuple(source[src].shape)}, "
                                 f"LPIPS {net} needs {tuple(param.shape)}")
            target[key] = source[src]
        extra = sorted(k for k in source if k.startswith("features.") and k.split(".", 1)[1] not in
                       {k2.split(".", 1)[1] for k2 in target})
        if extra:
            raise ValueError(f"{self.backbone}: unexpected tensor {extra[0]} for LPIPS {net}")
        self.model.net.load_state_dict(target)
        self.device = torch.device(device)
        self.model.to(self.device).eval()

    def mean_pairwise(self, images: Sequence[Image.Image]) -> float:
        """Mean LPIPS over all unordered pairs; NaN for fewer than two images (no diversity to measure)."""
        if len(images) < 2:
            return float("nan")
        from proxytune.images import to_tensor

        size = images[0].size
        x = to_tensor([im.resize(size) for im in images]).to(self.device)
        i, j = torch.triu_indices(len(images), len(images), offset=1)
        with torch.inference_mode():
            return float(self.model(x[i], x[j]).double().mean())

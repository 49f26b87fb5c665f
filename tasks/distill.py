"""Stage `distill`: tune the AR student with the method `student.method` names (see `proxytune.tuning`).

Training images come from `student.data`: the supervisor's proxies (Proxy-Tuning), the prepared references
(Sun et al.), both, or augmented references (Proxy-Tuning's baseline); `student.extra_subjects` adds other
subjects' proxy folders so one adapter learns several identifiers. Images are tokenised once and the codes
cached by (tokenizer weights, image content), so re-runs with other tuning params never re-encode.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

from ar_models import ARStudent, load_student
from orchestration.cache import checkpoint_dir
from proxytune.images import load_rgb, to_pil, to_tensor
from proxytune.io import atomic_dir, atomic_file, cache_dir, read_jsonl, read_or_heal, sha256_file, sha256_json
from proxytune.params import ProxytuneError, get
from proxytune.prompts import class_prompt
from proxytune.training import Checkpointer, train, write_loss_csv
from proxytune.tuning import TuneConfig, TuningData, build_recipe, write_card


def tokenise_cached(student: ARStudent, files: list[Path], vq_checkpoint: str, image_size: int | None = None
                    ) -> torch.Tensor:
    """Codes (N, T) for `files`, reusing any image already encoded by the same tokenizer weights. Images of
    another size than `image_size` (a supervisor at 1024 px, a student at 256) are resized to it first."""
    folder = cache_dir("codes") / (sha256_file(vq_checkpoint)[:16] + (f"-{image_size}" if image_size else ""))
    folder.mkdir(exist_ok=True)
    keys = [sha256_file(f) for f in files]
    codes = [read_or_heal(folder / f"{k}.safetensors", lambda path: load_file(str(path))["codes"]) for k in keys]
    missing = [i for i, c in enumerate(codes) if c is None]

    def load(path):
        img = load_rgb(path)
        if image_size and img.size != (image_size, image_size):
            img = ImageOps.fit(img, (image_size, image_size), method=Image.Resampling.LANCZOS)
        return img

    for start in range(0, len(missing), 16):
        chunk = missing[start:start + 16]
        with torch.inference_mode():
            encoded = student.encode_images(to_tensor([load(files[i]) for i in chunk]))
        for i, c in zip(chunk, encoded):
            with atomic_file(folder / f"{keys[i]}.safetensors") as tmp:
                save_file({"codes": c.contiguous()}, str(tmp))
            codes[i] = c.cpu().clone()  # a plain tensor, as loading gives
    return torch.stack(codes)


def augment(image: Image.Image, rng: random.Random) -> Image.Image:
    """Proxy-Tuning's augmentation baseline: horizontal flip, rotation within ±5°, random crop of 90-100%."""
    size = image.size
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    image = image.rotate(rng.uniform(-5, 5), resample=Image.BICUBIC, fillcolor=(255, 255, 255))
    scale = rng.uniform(0.9, 1.0)
    w, h = int(size[0] * scale), int(size[1] * scale)
    left, top = rng.randint(0, size[0] - w), rng.randint(0, size[1] - h)
    return image.crop((left, top, left + w, top + h)).resize(size, Image.BICUBIC)


def augmented_references(prepared: Path, rows: list[dict], copies: int, seed: int) -> list[tuple[Path, str]]:
    """`copies` augmented versions of each reference, written once to the cache (content-keyed)."""
    folder = cache_dir("augmented") / sha256_json([r["sha256"] for r in rows] + [copies, seed])[:16]
    rng = random.Random(seed)
    out = []
    for r in rows:
        source = Image.open(prepared / r["file"]).convert("RGB")
        for c in range(copies):
            image = augment(source, rng)  # drawn even when cached, so the sequence never shifts
            path = folder / f"{Path(r['file']).stem}-{c:03d}.png"
            if read_or_heal(path, load_rgb) is None:
                folder.mkdir(parents=True, exist_ok=True)
                with atomic_file(path) as tmp:
                    image.save(tmp, format="PNG")
            out.append((path, r["caption"]))
    return out


def training_images(s: dict, seed: int, paths: dict[str, Path]) -> tuple[list[tuple[Path, str]], list[str]]:
    """(image file, prompt) pairs for `student.data` (the proxies and prepared references in `paths`), and the
    hashes of the manifests they came from."""
    proxies, prepared = paths["proxies"], paths["prepared"]
    source = s["data"]
    pairs, hashes = [], []
    if source in ("proxies", "proxies+references"):
        for folder in [proxies, *map(Path, s["extra_subjects"])]:
            manifest = folder / "manifest.jsonl"
            if not manifest.is_file():
                raise ProxytuneError(f"{manifest}: no proxy manifest (student.data / student.extra_subjects)")
            pairs += [(folder / r["file"], r["prompt"]) for r in read_jsonl(manifest)]
            hashes.append(sha256_file(manifest))
    refs = read_jsonl(prepared / "captions.jsonl")
    if source in ("references", "proxies+references"):
        pairs += [(prepared / r["file"], r["caption"]) for r in refs]
        hashes.append(sha256_file(prepared / "captions.jsonl"))
    if source == "augmented_references":
        pairs += augmented_references(prepared, refs, s["augment_copies"], seed)
        hashes.append(sha256_file(prepared / "captions.jsonl"))
    return pairs, hashes


def prior_samples(student: ARStudent, s: dict, prompt: str, seed: int) -> list[Path]:
    """ARBooth's prior set: the frozen base model's own samples for the class prompt, rendered once and
    cached by (base weights, prompt, sampling settings, seed, count)."""
    a = s["arbooth"]
    count = int(a["prior_images"])
    sampling = {"cfg_scale": float(a["prior_cfg_scale"]), "top_k": int(a["prior_top_k"]),
                "top_p": float(a["prior_top_p"]), "temperature": 1.0}
    base = [sha256_file(s[k]) for k in ("checkpoint", "vq_checkpoint") if Path(str(s.get(k))).is_file()]
    folder = cache_dir("prior") / sha256_json([base, s["family"], s["size"], prompt, sampling, seed, count])[:16]
    files = [folder / f"{i:04d}.png" for i in range(count)]
    missing = {i for i, f in enumerate(files) if read_or_heal(f, load_rgb) is None}
    for start in range(0, count, 8):  # a batch of 8 shares a seed: one missing file re-renders its batch
        n = min(8, count - start)
        if missing.isdisjoint(range(start, start + n)):
            continue
        with torch.inference_mode():
            images = student.generate([prompt] * n, seed=seed * 100003 + start, **sampling)
        for i, img in zip(range(start, start + n), to_pil(images)):
            if i in missing:
                with atomic_file(files[i]) as tmp:
                    img.save(tmp, format="PNG")
    return files


def tune_config(s: dict, seed: int) -> TuneConfig:
    """The recipe's settings from the `student` section (`proxytune.schema` checked it)."""
    keys = ("method", "steps", "batch_size", "grad_accum", "learning_rate", "cond_dropout", "mixed_precision",
            "gradient_checkpointing", "lora_rank", "lora_alpha", "lora_dropout", "lora_groups", "lora_every_nth_layer")
    cfg = TuneConfig(seed=seed, **{k: s[k] for k in keys})
    two, arb = s["two_stage"], s["arbooth"]
    if cfg.method == "two_stage":
        cfg.embedding_steps, cfg.embedding_lr = two["embedding_steps"], two["embedding_lr"]
        cfg.stage2, cfg.image_tokens = two["stage2"], two["image_tokens"]
        if cfg.stage2 == "none":
            cfg.steps = 0
    if cfg.method == "arbooth":
        cfg.prefix_tokens, cfg.prior_weight = arb["prefix_tokens"], arb["prior_weight"]
        cfg.tune_groups, cfg.betas = list(arb["tune_groups"]), tuple(arb["betas"])
    return cfg


def run(params: dict, log, paths: dict[str, Path]) -> dict:
    """Tune the student; write its artifacts (adapter / identifiers / tuned weights) and a card to `paths["out"]`."""
    s = params["student"]
    seed = int(get(params, "seed"))
    identifier, class_noun = get(params, "subject.identifier"), get(params, "subject.class_noun")
    cfg = tune_config(s, seed)
    pairs, hashes = training_images(s, seed, paths)
    student = load_student(s)
    codes = tokenise_cached(student, [f for f, _ in pairs], s["vq_checkpoint"], int(s["image_size"]))
    data = TuningData(codes=codes, prompts=[p for _, p in pairs], identifier=identifier, class_noun=class_noun)
    if cfg.method == "arbooth":  # ARBooth's scale-wise loss; None for raster students
        data.token_weights = student.scale_token_weights(**s["arbooth"]["scale_weights"])
    if cfg.method == "arbooth" and cfg.prior_weight > 0:
        data.prior_prompt = class_prompt(params)
        data.prior_codes = tokenise_cached(student, prior_samples(student, s, data.prior_prompt, seed),
                                           s["vq_checkpoint"], int(s["image_size"]))
    recipe = build_recipe(student, cfg)
    try:
        recipe.setup(data)
    except ValueError as e:
        raise ProxytuneError(f"params: student: {e}") from None
    total = cfg.steps + (cfg.embedding_steps if cfg.method == "two_stage" else 0)
    checkpoints = Checkpointer(checkpoint_dir("distill", params, paths), s["checkpoint_every"])
    history = train(recipe, total, log, checkpoints, "distill")
    out = paths["out"]
    with atomic_dir(out) as tmp:
        files = recipe.save(tmp)
        write_card(tmp, cfg, s, files, {"identifier": identifier, "class_noun": class_noun,
                                        "sources": s["data"], "manifest_sha256": hashes,
                                        "num_images": len(pairs)},
                   history[-1]["loss"] if history else None)
    write_loss_csv(paths["loss_csv"], history)
    checkpoints.clear()
    log.artifact(out, "student")  # with card.json: `load_tuned` on the downloaded folder works
    return {"out_dir": str(out), "files": files, "loss_csv": str(paths["loss_csv"])}


"""Our implementations against the ones a user would pick instead, same weights, side by side in one run.

Every row first asserts that both sides produce the same output (tokens, scores, loss), then times them
alternately `--repeats` times; the ratio is ours / peer in throughput (> 1: we are ahead), from the fastest run of
each (min and median printed). Peers (bench/peers.py): transformers' Janus image generation; transformers'
`generate` for Lumina-mGPT's Chameleon; a plain per-image DINO/CLIP loop; diffusers' train_dreambooth_lora.py
step. Writes bench/results/peers.json. `--only janus,chameleon,scoring,supervisor` runs a subset.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import peers  # noqa: E402
from bench.timing import alternate, throughput  # noqa: E402

CFG_SCALE = 5.0
PROMPTS = ["a sks dog on the beach", "a sks dog in the snow", "a sks dog wearing a red hat", "a sks dog on a table"]
# ~100M parameters in the language model and heads (Janus-Pro-1B's layout, shrunk), 256 image tokens
JANUS_100M = {"dim": 768, "n_layer": 12, "n_head": 12, "ffn_dim": 2048, "max_positions": 1024, "vision_dim": 32,
              "vision_layers": 1, "vision_heads": 2}


def row(name: str, work: float, unit: str, times: dict, note: str = "") -> dict:
    """Throughput of both sides (work per second, from the fastest run and the median) and the ratio."""
    r = {"work": work, "unit": unit, "times": times, "note": note, **throughput(work, times, "ours", "peer")}
    print(f"{name:<44}{r['ours_per_s']:10.2f}{r['peer_per_s']:10.2f}{r['ratio']:8.2f}x{r['ratio_median']:8.2f}x"
          f"  {unit}")
    if note:
        print(f"    {note}")
    return r


def tokens_equal(what: str):
    def check(ours, peer):
        assert torch.equal(ours, peer), f"{what}: our tokens differ from the peer's"
    return check


def janus_students(work: Path) -> dict:
    """The tiny Janus-Pro replica (128 px: 16x16 codes) and a ~100M one sharing its tokenizer and processor."""
    from dataclasses import replace

    from ar_models.janus_pro import SIZES, JanusProStudent
    from ar_models.llamagen import VQConfig
    from proxytune.prompts import corpus_words
    from testbed.tiny_students import build_tiny_janus_pro

    image_size = 128
    paths = build_tiny_janus_pro(work / "janus", corpus_words(), image_size=image_size)
    tiny = JanusProStudent.from_paths(paths["checkpoint"], "tiny", image_size)
    from transformers import JanusForConditionalGeneration

    size = replace(SIZES["tiny"], **JANUS_100M, image_size=image_size,
                   vq=VQConfig(codebook_size=16384, ch=32, ch_mult=(1, 1, 2, 2, 4), z_channels=32, num_res_blocks=1))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = JanusForConditionalGeneration(size.config(tiny.tokenizer, image_size)).eval()
    medium = JanusProStudent(model, tiny.processor, image_size)
    return {"tiny": tiny, "100M": medium}


def language_params(student) -> int:
    m = student.model.model
    return sum(p.numel() for mod in (m.language_model, m.generation_embeddings, m.generation_aligner,
                                     m.generation_head) for p in mod.parameters())


def bench_janus(work: Path, repeats: int) -> dict:
    out = {}
    for size, student in janus_students(work).items():
        for batch in (1, 4):
            prompts = PROMPTS[:batch]
            cond = student.encode_prompts(prompts)
            ours = lambda: student.sample_tokens(cond, cfg_scale=CFG_SCALE, seed=0)  # noqa: E731
            peer = lambda: peers.janus_generate(student, prompts, CFG_SCALE, 0)  # noqa: E731
            name = f"Janus-Pro {size} ({language_params(student) / 1e6:.1f}M), batch {batch}, CFG"
            times = alternate({"ours": ours, "peer": peer}, repeats, check=tokens_equal(f"Janus {size}"))
            out[f"{size}_batch{batch}"] = row(name, batch * student.num_image_tokens, "image tokens/s", times)
    return out


def bench_chameleon(repeats: int) -> dict:
    from ar_models.lumina_mgpt import LuminaMGPTStudent
    from proxytune.prompts import corpus_words
    from testbed.tiny_students import tiny_lumina_mgpt_components

    student = LuminaMGPTStudent(*tiny_lumina_mgpt_components(corpus_words(), 0, 128), image_size=128)
    out = {}
    for batch in (1, 4):
        prompts = PROMPTS[:batch]
        cond = student.encode_prompts(prompts)
        ours = lambda: student.sample_tokens(cond, cfg_scale=CFG_SCALE, top_k=1, seed=0)  # noqa: E731
        peer = lambda: peers.chameleon_generate(student, prompts, CFG_SCALE)  # noqa: E731
        out[f"tiny_batch{batch}"] = row(
            f"Lumina-mGPT tiny, {student.grid}x{student.grid} codes, batch {batch}, CFG", batch * student.grid ** 2,
            "image tokens/s",
            alternate({"ours": ours, "peer": peer}, repeats, check=tokens_equal("Lumina-mGPT")),
            "greedy on both sides (transformers' generate draws from the global RNG, one draw per end-of-line step "
            "too); the peer runs the unconditional stream as a second forward and end-of-line as a step")
    return out


def bench_scoring(work: Path, repeats: int, n_images: int = 48, n_refs: int = 4) -> dict:
    from PIL import Image

    from proxytune.metrics import ClipEmbedder, DinoEmbedder, prompt_scores
    from testbed.tiny_evaluators import build_tiny_evaluators

    tiny = build_tiny_evaluators(work / "evaluators")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)) for _ in range(n_images + n_refs)]
    gen, refs = images[:n_images], images[n_images:]
    prompts = [PROMPTS[i % len(PROMPTS)].replace("sks ", "") for i in range(n_images)]
    dino = DinoEmbedder(tiny["dino"])
    clip = ClipEmbedder(tiny["clip_model_name"], tiny["clip_pretrained"], config_dir=tiny["clip_config_dir"])
    ours = lambda: prompt_scores(gen, prompts, refs, dino, clip)  # noqa: E731
    scorer = peers.PerImageScorer(tiny["dino"], tiny["clip_model_name"], tiny["clip_pretrained"],
                                  tiny["clip_config_dir"])
    peer = lambda: scorer.scores(gen, prompts, refs)  # noqa: E731

    def check(a, b):
        for x, y in zip(a, b, strict=True):
            for k in ("dino", "clip_i", "clip_t"):
                assert abs(x[k] - y[k]) < 1e-5, f"score {k} of {x['prompt']!r}: ours {x[k]} vs per-image loop {y[k]}"

    return {"tiny_evaluators": row(
        f"DINO + CLIP-I + CLIP-T, {n_images} images + {n_refs} refs", n_images + n_refs, "images/s",
        alternate({"ours": ours, "peer": peer}, repeats, check=check),
        "peer: a plain per-image loop (transformers ViTModel, open_clip), both sides' models loaded before timing; "
        "torchmetrics is not a dependency and its CLIPScore loads transformers-format CLIP only")}


def bench_supervisor(work: Path, steps: int, repeats: int) -> dict:
    from PIL import Image

    from proxytune.prompts import corpus_words
    from testbed.tiny_supervisors import build_tiny_supervisor

    model = build_tiny_supervisor(work / "sd", corpus_words(), seed=0, image_size=64)
    rng = np.random.default_rng(0)
    (work / "instance").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(work / "instance" / f"{i}.png")
    os.environ["PROXYTUNE_CACHE"] = str(work / "cache")
    ours, peer = supervisor_pair(str(model), sorted((work / "instance").glob("*.png")))
    loss_ours, loss_peer = ours.train_step()["loss"], peer.train_step()
    assert abs(loss_ours - loss_peer) <= 1e-5 * abs(loss_ours), f"first step loss {loss_ours} vs {loss_peer}"

    def run(side):
        return lambda: [side.train_step() for _ in range(steps)]

    result = row(f"DreamBooth LoRA step, tiny SD, batch {ours.cfg.batch_size} + prior", steps, "steps/s",
                 alternate({"ours": run(ours), "peer": run(peer)}, repeats),
                 "both: cached latents, text embeddings computed once, fp32, one UNet forward of the instance and "
                 "class halves")
    return {"sd_tiny": result}


def supervisor_pair(model: str, instance_images: list[Path]):
    """Our recipe set up on `model` and the script's state built from the same LoRA weights, latents and text
    embeddings, drawing from a copy of our generator: their first steps see the same batch."""
    from peft.utils import get_peft_model_state_dict

    from proxytune.dreambooth import DreamBoothConfig, DreamBoothLoRA

    cfg = DreamBoothConfig(model=model, instance_images=instance_images, instance_prompt="a photo of sks toy",
                           class_prompt="a photo of toy", batch_size=2, num_class_images=4, sample_steps=2,
                           prior_preservation=True, cache_latents=True, mixed_precision="fp32", snr_gamma=0.0,
                           lora_dropout=0.0, train_text_encoder=False, pivotal_tokens=0, seed=0)
    ours = DreamBoothLoRA(cfg)
    ours.setup()
    generator = torch.Generator().manual_seed(0)
    generator.set_state(ours.generator.get_state())
    embeds = lambda prompts: torch.cat([ours.embeds[p]["encoder_hidden_states"] for p in prompts])  # noqa: E731
    peer = peers.ScriptDreamBooth.load(
        model, get_peft_model_state_dict(ours.denoiser), ours.instance_pixels, ours.class_pixels,
        embeds(ours.instance_prompts), embeds([cfg.class_prompt] * len(ours.class_images)), cfg, generator)
    return ours, peer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="janus,chameleon,scoring,supervisor")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="proxytune-peers-"))
    started = time.perf_counter()
    print(f"{args.threads} threads, load average {os.getloadavg()}; ratio = ours / peer throughput (> 1: ahead), "
          f"fastest of {args.repeats} alternated runs, then median")
    print(f"{'':<44}{'ours':>10}{'peer':>10}{'ratio':>9}{'median':>9}")
    sections = {"janus": lambda: bench_janus(work, args.repeats), "chameleon": lambda: bench_chameleon(args.repeats),
                "scoring": lambda: bench_scoring(work, args.repeats),
                "supervisor": lambda: bench_supervisor(work, 5, args.repeats)}
    results = {name: sections[name]() for name in args.only.split(",")}
    results["bench_seconds"] = time.perf_counter() - started
    results["threads"] = args.threads
    out = REPO / "bench" / "results" / "peers.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    out.write_text(json.dumps({**previous, **results}, indent=2))
    print(f"total {results['bench_seconds']:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()

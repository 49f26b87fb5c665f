"""Stage `bootstrap`: build the embedded default, so the pipeline runs with no model hub.

Writes tiny random-init models in their real on-disk formats (a diffusers pipeline folder, LlamaGen's
official checkpoint layout, Lumina-mGPT's, Janus-Pro's, VAR's and Infinity's released layouts, transformers/open_clip
evaluator weights) and the demo subject's photos (the miniature world's subject 0, which the world-pretrained models
in models/world, shipped with the project, have never seen). Real runs point params.yaml at real weights.
"""
from __future__ import annotations

from pathlib import Path

from proxytune.io import atomic_dir
from proxytune.params import get
from proxytune.prompts import corpus_words
from testbed.demo import write_demo_subject
from testbed.tiny_evaluators import build_tiny_evaluators
from testbed.tiny_students import (
    build_tiny_infinity,
    build_tiny_janus_pro,
    build_tiny_llamagen,
    build_tiny_lumina_mgpt,
    build_tiny_var,
)
from testbed.tiny_supervisors import build_tiny_supervisor


def run(params: dict, log, paths: dict[str, Path]) -> dict:
    """Build every tiny model into `paths["models"]` and the demo photos into `paths["demo_subject"]`, with a
    fixed seed; identical params give byte-identical weights."""
    seed = int(get(params, "seed"))
    size = int(get(params, "bootstrap.image_size"))
    corpus = corpus_words()
    with atomic_dir(paths["models"]) as tmp:
        build_tiny_supervisor(tmp / "supervisor", corpus, seed=seed, image_size=size)
        build_tiny_llamagen(tmp / "llamagen", corpus, seed=seed, image_size=size)
        build_tiny_lumina_mgpt(tmp / "lumina_mgpt", corpus, seed=seed, image_size=size)
        build_tiny_janus_pro(tmp / "janus_pro", corpus, seed=seed, image_size=size)
        build_tiny_infinity(tmp / "infinity", corpus, seed=seed, image_size=size)
        build_tiny_var(tmp / "var", corpus, seed=seed, image_size=size)
        build_tiny_evaluators(tmp / "evaluators", seed=seed, image_size=size)
    write_demo_subject(paths["demo_subject"], seed=seed)
    return {"models": str(paths["models"]), "demo_subject": str(paths["demo_subject"])}


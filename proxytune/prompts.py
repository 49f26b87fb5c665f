"""Prompt templates: training captions, the proxy prompt bank and held-out evaluation prompts.

The bank follows DreamBench's three kinds of prompt: re-contextualisation (new scenes),
accessorisation (things added to the subject) and property change (the subject itself altered).
"""
from __future__ import annotations

RECONTEXT = [
    "a {} on the beach",
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on a cobblestone street",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} on top of a wooden floor",
    "a {} floating on top of water",
]
ACCESSORIES = [
    "a {} wearing a red hat",
    "a {} wearing a santa hat",
    "a {} with a wheat field in the background",
    "a {} next to a green cup",
]
PROPERTIES = [
    "a red {}",
    "a shiny {}",
    "a cube shaped {}",
    "a purple {}",
]
PROXY_BANK = RECONTEXT + ACCESSORIES + PROPERTIES

# Held out from the proxy bank, so evaluation measures generalisation to unseen contexts.
EVAL_PROMPTS = [
    "a {} on top of pink fabric",
    "a {} in a purple wizard outfit",
    "a {} with the eiffel tower in the background",
    "a {} on top of a dirt road",
    "a {} with a blue house in the background",
    "a wet {}",
]

CAPTION = "a photo of {}"


def subject_phrase(identifier: str, class_noun: str) -> str:
    return f"{identifier} {class_noun}"


def corpus_words() -> list[str]:
    """Every prompt in the project's templates, used to train the tiny models' tokenizers locally."""
    nouns = ["dog", "cat", "toy", "backpack", "can", "ball", "cup", "sks"]
    templates = PROXY_BANK + EVAL_PROMPTS + [CAPTION]
    return [t.format(f"{ident} {noun}".strip()) for t in templates for noun in nouns for ident in ("", "sks")]

"""Prompt templates: training captions, the proxy prompt bank and held-out evaluation prompts.

The bank follows DreamBench's three kinds of prompt: re-contextualisation (new scenes),
accessorisation (things added to the subject) and property change (the subject itself altered).
Templates hold one `{}` where the subject phrase ("sks dog") goes.
"""
from __future__ import annotations

import re

RECONTEXT = [
    "a {} on the beach",
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on a cobblestone street",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} on top of a wooden floor",
    "a {} floating on top of water",
    "a {} with a wheat field in the background",
    "a {} on top of a purple rug in a forest",
    "a {} with a tree and autumn leaves in the background",
    "a {} on top of green grass with sunflowers around it",
    "a {} on top of a mirror",
    "a {} on top of the sidewalk in a crowded street",
    "a {} on top of a white rug",
    "a {} floating in an ocean of milk",
]
ACCESSORIES = [
    "a {} wearing a red hat",
    "a {} wearing a santa hat",
    "a {} wearing a rainbow scarf",
    "a {} wearing a black top hat and a monocle",
    "a {} wearing pink glasses",
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


def class_prompt(params: dict) -> str:
    """The bare class prompt, in the subject's caption: DreamBooth's class images, the student's prior data and
    PRES all draw it."""
    subject = params["subject"]
    return subject["caption"].format(subject["class_noun"])


def with_token(prompt: str, identifier: str, token: str | None) -> str:
    """`prompt` as a supervisor with pivotal-tuned tokens must read it: the identifier word becomes `token`
    ('a sks dog' -> 'a <sks> dog'); None (no learned tokens) leaves it as it is."""
    if token is None:
        return prompt
    return re.sub(rf"(?<![\w<]){re.escape(identifier)}(?![\w>])", lambda _: token, prompt)


def proxy_cycle(user_prompts: list[str] = ()) -> list[str]:
    """Every bank template once (user templates as a fourth kind), each kind spread evenly through the
    cycle (R A P R R A R P ...), so any run of prompts mixes the kinds instead of exhausting one first."""
    kinds = [kind for kind in (RECONTEXT, ACCESSORIES, PROPERTIES, list(user_prompts)) if kind]
    keyed = [(j / len(kind), k, t) for k, kind in enumerate(kinds) for j, t in enumerate(kind)]
    return [t for *_, t in sorted(keyed)]


def proxy_prompts(phrase: str, count: int, user_prompts: list[str] = ()) -> list[str]:
    """`count` prompts cycling through the bank, so every kind of context is covered evenly."""
    cycle = proxy_cycle(user_prompts)
    return [cycle[i % len(cycle)].format(phrase) for i in range(count)]


def corpus_words() -> list[str]:
    """Every prompt in the project's templates, used to train the tiny models' tokenizers locally."""
    nouns = ["dog", "cat", "toy", "backpack", "can", "ball", "cup", "sks"]
    templates = PROXY_BANK + EVAL_PROMPTS + [CAPTION]
    return [t.format(f"{ident} {noun}".strip()) for t in templates for noun in nouns for ident in ("", "sks")]

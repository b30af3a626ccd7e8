"""Prompt sets for the paper's recipes, drawn from a caption bank written for this pack.

concept_prompts: captions that carry a concept in varied phrasings vs. the same captions without it
                 ("remove": source has it, target does not; "add": the other way round).
style_prompts:   plain captions vs. the same captions with a style's tags appended.
Both are seeded and deterministic: the same inputs give the same lines.
"""
from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

CAPTIONS_FILE = Path(__file__).resolve().parent / "data" / "captions.txt"

# How a concept joins a caption; {c} is the caption, {x} the concept phrase.
CONCEPT_TEMPLATES = (
    "{c}, with {x}",
    "{c} and {x}",
    "{c}, {x} in the background",
    "{c}, {x} in the foreground",
    "{c}, next to {x}",
    "{x} beside {c}",
    "{c}, featuring {x}",
    "{c}, a scene that includes {x}",
    "{c}, {x} nearby",
    "{c}, and {x} can be seen",
    "{c}, {x} visible in the picture",
    "{c} with {x} close by",
)

STYLES: dict[str, tuple[str, ...]] = {
    "anime": ("anime style", "anime illustration, cel shading", "in the style of a japanese anime film",
              "anime key visual, vibrant colors"),
    "watercolor": ("watercolor painting", "soft watercolor illustration, wet on wet",
                   "loose watercolor sketch on textured paper", "watercolor, pastel washes"),
    "cyberpunk": ("cyberpunk style, neon lights", "cyberpunk, futuristic city glow, neon",
                  "in a cyberpunk aesthetic, rain and neon", "cyberpunk art, magenta and cyan lighting"),
    "impressionism": ("impressionist painting", "in the style of impressionism, visible brush strokes",
                      "impressionist oil painting, dappled light", "impressionism, loose brushwork"),
    "art nouveau": ("art nouveau illustration", "art nouveau poster, ornamental lines",
                    "in the style of art nouveau, flowing organic forms", "art nouveau, decorative border"),
    "sketch": ("pencil sketch", "graphite sketch, hand drawn", "rough charcoal sketch", "ink sketch, line drawing"),
    "pixel art": ("pixel art", "16-bit pixel art", "retro pixel art, limited palette", "pixel art game scene"),
    "photorealistic": ("photorealistic", "professional photograph, sharp focus", "photorealistic, natural light, 35mm",
                       "high detail photo, realistic"),
}
DIRECTIONS = ("remove", "add")


class PromptError(ValueError):
    pass


@lru_cache(maxsize=1)
def caption_bank() -> tuple[str, ...]:
    lines = CAPTIONS_FILE.read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def _captions(count: int, seed: int, own: str) -> list[str]:
    pool = [line.strip() for line in (own or "").splitlines() if line.strip()] or list(caption_bank())
    if count < 1:
        raise PromptError("count must be at least 1")
    rng = random.Random(seed)
    picked: list[str] = []
    while len(picked) < count:  # whole shuffled passes, so small own lists are reused evenly
        batch = pool[:]
        rng.shuffle(batch)
        picked.extend(batch[:count - len(picked)])
    return picked


def concept_prompts(concept: str, direction: str = "remove", count: int = 64, seed: int = 0,
                    captions: str = "") -> tuple[list[str], list[str]]:
    """(source, target): for "remove" the source captions carry the concept, the targets do not."""
    phrase = (concept or "").strip()
    if not phrase:
        raise PromptError("concept is empty: type the thing to remove or add, e.g. 'a pink elephant'")
    if direction not in DIRECTIONS:
        raise PromptError(f"direction must be one of {DIRECTIONS}")
    rng = random.Random(seed + 1)
    plain = _captions(count, seed, captions)
    with_concept = [rng.choice(CONCEPT_TEMPLATES).format(c=c, x=phrase) for c in plain]
    return (with_concept, plain) if direction == "remove" else (plain, with_concept)


def style_prompts(style: str, count: int = 64, seed: int = 0, custom_tags: str = "",
                  captions: str = "") -> tuple[list[str], list[str]]:
    """(source, target): plain captions, and the same captions with the style's tags appended."""
    tags = [t.strip() for t in (custom_tags or "").splitlines() if t.strip()]
    if not tags:
        if style not in STYLES:
            raise PromptError(f"unknown style {style!r}; pick one of {', '.join(STYLES)} or type custom tags")
        tags = list(STYLES[style])
    rng = random.Random(seed + 2)
    plain = _captions(count, seed, captions)
    return plain, [f"{c}, {rng.choice(tags)}" for c in plain]

"""Steering tasks on the shapes model, and how each is measured.

A task gives prompt pairs to fit maps on (source: what the model does now, target: what it should do),
held-out prompts to evaluate on, and two measures read from the pictures:
  presence  the share of pictures showing what the task asks for (the style, the removed concept...)
  kept      the share of pictures that keep the rest of the prompt (objects, colours, count)

    task = TASKS["style"]
    source, target = task.fit_prompts(64)
    scenes = task.eval_scenes(64)
    presence, kept = task.measure(lab.score(images), scenes)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import shapes

FIT_SEED = 77  # fit prompts and evaluation prompts come from different draws
EVAL_SEED = 1234


def _others(colour: str, i: int) -> str:
    rest = [c for c in shapes.COLOURS if c != colour]
    return rest[i % len(rest)]


@dataclass
class Task:
    name: str
    description: str
    scene_filter: Callable[[dict], bool]
    source: Callable[[dict], str]             # the prompt as evaluated (and the fit's source side)
    target: Callable[[dict, int], str]        # the fit's target side (and the upper bound's prompt)
    present: Callable[[dict, dict], bool]     # (scored picture, scene) -> what the task asks for
    kept: Callable[[dict, dict], bool]        # (scored picture, scene) -> the rest survived
    concept: str = ""                         # the word a negative prompt would name

    def _scenes(self, n: int, seed: int) -> list[dict]:
        rng = np.random.default_rng(seed)
        out = []
        while len(out) < n:
            scene = shapes.random_scene(rng)
            if self.scene_filter(scene):
                out.append(scene)
        return out

    def fit_prompts(self, n: int, seed: int = FIT_SEED) -> tuple[list[str], list[str]]:
        scenes = self._scenes(n, seed)
        return [self.source(s) for s in scenes], [self.target(s, i) for i, s in enumerate(scenes)]

    def eval_scenes(self, n: int, seed: int = EVAL_SEED) -> list[dict]:
        """n scenes whose evaluated prompts were never trained on."""
        rng = np.random.default_rng(seed)
        out = []
        while len(out) < n:
            scene = shapes.random_scene(rng)
            if self.scene_filter(scene) and shapes.is_held_out(self.source(scene)):
                out.append(scene)
        return out

    def prompts(self, scenes: list[dict]) -> list[str]:
        return [self.source(s) for s in scenes]

    def targets(self, scenes: list[dict]) -> list[str]:
        return [self.target(s, i) for i, s in enumerate(scenes)]

    def measure(self, found: list[dict], scenes: list[dict]) -> tuple[float, float]:
        """(presence, kept): kept against what the prompt asks for."""
        presence = float(np.mean([self.present(f, s) for f, s in zip(found, scenes)]))
        kept = float(np.mean([self.kept(f, s) for f, s in zip(found, scenes)]))
        return presence, kept

    def kept_from(self, found: list[dict], untouched: list[dict]) -> float:
        """Share of pictures that keep what the untouched model drew with the same seed (its objects;
        for a removal, its shapes): what steering changed besides the task, whatever the model's own
        accuracy."""
        return float(np.mean([self.kept(f, u) for f, u in zip(found, untouched)]))


def _plain(scene: dict) -> str:
    return shapes.caption(scene["objects"], "plain", say_plain=False)


def _has(colour: str) -> Callable[[dict], bool]:
    return lambda scene: any(o["colour"] == colour for o in scene["objects"])


def _recoloured(colour: str) -> Callable[[dict, int], str]:
    def target(scene: dict, i: int) -> str:
        objs = [dict(o, colour=_others(colour, i)) if o["colour"] == colour else o for o in scene["objects"]]
        return shapes.caption(objs, "plain", say_plain=False)
    return target


def _shapes_kept(found: dict, scene: dict) -> bool:
    """Count and shapes as prompted (colours may change: that is what removal of a colour does)."""
    return sorted(o["shape"] for o in found["objects"]) == sorted(o["shape"] for o in scene["objects"])


def _has_shape(shape: str) -> Callable[[dict], bool]:
    return lambda scene: any(o["shape"] == shape for o in scene["objects"])


def _reshaped(shape: str) -> Callable[[dict, int], str]:
    rest = [s for s in shapes.SHAPES if s != shape]

    def target(scene: dict, i: int) -> str:
        objs = [dict(o, shape=rest[i % len(rest)]) if o["shape"] == shape else o for o in scene["objects"]]
        return shapes.caption(objs, "plain", say_plain=False)
    return target


def _colours_kept(found: dict, scene: dict) -> bool:
    """Count and colours as prompted (shapes may change: that is what removal of a shape does)."""
    return sorted(o["colour"] for o in found["objects"]) == sorted(o["colour"] for o in scene["objects"])


TASKS = {
    "style": Task(
        "style", "plain -> striped background; prompts never name a background",
        scene_filter=lambda s: True, source=_plain,
        target=lambda s, i: _plain(s) + " on a striped background",
        present=lambda f, s: f["background"] == "striped",
        kept=lambda f, s: shapes.content_matches(f, s), concept="plain background"),
    "remove_red": Task(
        "remove_red", "remove the colour red from prompts that ask for a red object",
        scene_filter=_has("red"), source=_plain, target=_recoloured("red"),
        present=lambda f, s: any(o["colour"] == "red" for o in f["objects"]),
        kept=_shapes_kept, concept="red"),
    "remove_cross": Task(
        "remove_cross", "remove crosses from prompts that ask for one",
        scene_filter=_has_shape("cross"), source=_plain, target=_reshaped("cross"),
        present=lambda f, s: any(o["shape"] == "cross" for o in f["objects"]),
        kept=_colours_kept, concept="cross"),
    "add_dots": Task(
        "add_dots", "add a dotted background to prompts of one object that never mention it",
        scene_filter=lambda s: len(s["objects"]) == 1, source=_plain,
        target=lambda s, i: _plain(s) + " on a dotted background",
        present=lambda f, s: f["background"] == "dotted",
        kept=lambda f, s: shapes.content_matches(f, s)),
}


def follow_rates(found: list[dict], scenes: list[dict]) -> dict[str, float]:
    """How often each attribute of the prompt is in the picture (held-out prompts, all backgrounds)."""
    def same(key):
        return float(np.mean([sorted(o[key] for o in f["objects"]) == sorted(o[key] for o in s["objects"])
                              for f, s in zip(found, scenes)]))
    return {"count": float(np.mean([f["count"] == len(s["objects"]) for f, s in zip(found, scenes)])),
            "colours": same("colour"), "shapes": same("shape"), "sizes": same("size"),
            "background": float(np.mean([f["background"] == s["background"] for f, s in zip(found, scenes)])),
            "all": float(np.mean([shapes.content_matches(f, s, sizes=True) and f["background"] == s["background"]
                                  for f, s in zip(found, scenes)]))}

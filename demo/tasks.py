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
# The concept Concept Prompts puts into the shapes captions (task concept_prompts_red, template ACT 1).
CONCEPT_PROMPTS_CONCEPT = "a large red square"
TUNE_SEED = 4242  # settings are chosen on these held-out prompts, never on the reported ones


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
    removal: bool = False                     # presence is what is left (lower is better)
    fit_source: Callable[[dict], str] | None = None  # the fit's source side when not the evaluated prompt
    prepare: Callable[[dict, np.random.Generator], dict] | None = None  # adds what the prompts need
    reference: Callable[[dict], dict] | None = None  # untouched picture -> what `kept` is checked against
    kept_against: str = "prompt"              # the headline kept: "prompt" or "untouched" (the strength-0 picture)
    fit_pairs: str = ""                       # how the fit pairs are built when not from source/target alone

    def _draw(self, rng: np.random.Generator) -> dict | None:
        scene = shapes.random_scene(rng)
        if not self.scene_filter(scene):
            return None
        return self.prepare(scene, rng) if self.prepare else scene

    def _scenes(self, n: int, seed: int) -> list[dict]:
        rng = np.random.default_rng(seed)
        out = []
        while len(out) < n:
            scene = self._draw(rng)
            if scene is not None:
                out.append(scene)
        return out

    def captions(self, n: int, seed: int = FIT_SEED) -> list[str]:
        """The fit scenes' plain captions: what a user would hand Concept Prompts' `captions`."""
        return [_plain(s) for s in self._scenes(n, seed)]

    def fit_prompts(self, n: int, seed: int = FIT_SEED) -> tuple[list[str], list[str]]:
        if self.fit_pairs == "concept prompts":  # the pack's own prompt builder, as a user would wire it
            source, target = _prompt_builders().concept_prompts(
                CONCEPT_PROMPTS_CONCEPT, "remove", count=n, seed=0, captions="\n".join(self.captions(n, seed)))
            return list(source), list(target)
        scenes = self._scenes(n, seed)
        source = self.fit_source or self.source
        return [source(s) for s in scenes], [self.target(s, i) for i, s in enumerate(scenes)]

    def eval_scenes(self, n: int, seed: int = EVAL_SEED, exclude: set[str] = frozenset(),
                    held_out: bool = True, tries: int | None = None) -> list[dict]:
        """n scenes whose objects' caption was never trained on (and whose prompt is not in `exclude`).
        held_out=False: any caption. tries: give up after that many draws (returns fewer)."""
        rng = np.random.default_rng(seed)
        out = []
        draws = 0
        while len(out) < n and (tries is None or draws < tries):
            draws += 1
            scene = self._draw(rng)
            if scene is None or self.source(scene) in exclude:
                continue
            if not held_out or shapes.is_held_out(_plain(scene)):
                out.append(scene)
        return out

    def tune_scenes(self, n: int, reported: list[dict]) -> list[dict]:
        """n scenes for choosing settings, none of whose prompts is among the reported ones: held-out
        captions where there are enough of them; where the reported set already uses every held-out
        caption (one object: 6 of the 48 captions), captions from training fill the rest."""
        exclude = set(self.prompts(reported))
        out = self.eval_scenes(n, seed=TUNE_SEED, exclude=exclude, tries=20000)
        if len(out) < n:
            out += self.eval_scenes(n - len(out), seed=TUNE_SEED + 1, exclude=exclude, held_out=False)
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
        return float(np.mean(self.kept_each(found, untouched)))

    def kept_each(self, found: list[dict], untouched: list[dict]) -> list[bool]:
        ref = self.reference or (lambda u: u)
        return [bool(self.kept(f, ref(u))) for f, u in zip(found, untouched)]

    def success(self, found: list[dict], scenes: list[dict], untouched: list[dict]) -> float:
        """Share of pictures where the task is done and the rest kept (the headline kept): what a
        setting is chosen by."""
        kept = (self.kept_each(found, untouched) if self.kept_against == "untouched"
                else [bool(self.kept(f, s)) for f, s in zip(found, scenes)])
        done = [bool(self.present(f, s)) != self.removal for f, s in zip(found, scenes)]
        return float(np.mean([d and k for d, k in zip(done, kept)]))


def _prompt_builders():
    """The pack's prompt builders (nodes/prompts.py, plain Python), loaded by path: this folder is also
    run outside ComfyUI, where 'nodes' would be ComfyUI's own module."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "nodes" / "prompts.py"
    spec = importlib.util.spec_from_file_location("comfyui_act_prompt_builders", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def _objects_kept(found: dict, reference: dict) -> bool:
    """Every object of the reference (colour and shape) is in the picture; more may be there."""
    have = [(o["colour"], o["shape"]) for o in found["objects"]]
    for o in reference["objects"]:
        key = (o["colour"], o["shape"])
        if key not in have:
            return False
        have.remove(key)
    return True


def _negated(kind: str) -> dict:
    """The paper's removal protocol: fit on 'captions and the concept' -> 'the captions', evaluate on
    'the captions without the concept', content kept against the strength-0 picture's other objects."""
    def is_concept(o: dict) -> bool:
        return o["shape"] == "cross" if kind == "cross" else o["colour"] == "red"

    def prepare(scene: dict, rng: np.random.Generator) -> dict:
        names = [c for c in shapes.COLOURS if c != "red"]
        rest = [s for s in shapes.SHAPES if s != "cross"]
        concept = {"size": ("small", "large")[int(rng.integers(2))],
                   "colour": "red" if kind == "red" else names[int(rng.integers(len(names)))],
                   "shape": "cross" if kind == "cross" else rest[int(rng.integers(len(rest)))]}
        return dict(scene, concept=concept)

    def words(o: dict) -> str:
        return f"a {o['size']} {o['colour']} {o['shape']}"

    return dict(
        scene_filter=lambda s: len(s["objects"]) <= 2 and not any(map(is_concept, s["objects"])),
        source=lambda s: f"{_plain(s)} without {words(s['concept'])}",
        fit_source=lambda s: shapes.caption(s["objects"] + [dict(s["concept"])], "plain", say_plain=False),
        target=lambda s, i: _plain(s),
        present=lambda f, s: any(map(is_concept, f["objects"])),
        kept=_objects_kept, removal=True, concept=kind, kept_against="untouched",
        reference=lambda u: dict(u, objects=[o for o in u["objects"] if not is_concept(o)]),
        prepare=prepare)


def _dropped(pairs: str) -> dict:
    """Removal with the pairs users write, which add or drop words: the fit's source names a red object
    wherever the pair puts it and its target leaves it out. pairs: "drop" (a red object of 2-3 dropped from
    its caption), "append" (the paper's "captions and the concept -> the captions", the concept first, in
    the middle or last in turn) or "concept prompts" (the pack's Concept Prompts "remove" over shapes
    captions, concept "a large red square"). Evaluated on prompts that name a red object first, in the
    middle or last in turn; kept against the strength-0 picture's other objects."""
    def is_red(o: dict) -> bool:
        return o["colour"] == "red"

    def red(rng: np.random.Generator) -> dict:
        if pairs == "concept prompts":  # CONCEPT_PROMPTS_CONCEPT
            return {"size": "large", "colour": "red", "shape": "square"}
        return {"size": ("small", "large")[int(rng.integers(2))], "colour": "red",
                "shape": shapes.SHAPES[int(rng.integers(len(shapes.SHAPES)))]}

    def prepare(scene: dict, rng: np.random.Generator) -> dict:
        at = int(rng.integers(len(scene["objects"]) + 1))
        return dict(scene, concept=red(rng), at=at)

    def named(scene: dict) -> list[dict]:
        objs = list(scene["objects"])
        objs.insert(scene["at"], dict(scene["concept"], cx=0.0, cy=0.0))
        return objs

    def fit_source(scene: dict) -> str:
        if pairs == "append last":
            return shapes.caption(scene["objects"] + [scene["concept"]], "plain", say_plain=False)
        return shapes.caption(named(scene), "plain", say_plain=False)

    return dict(
        scene_filter=lambda s: len(s["objects"]) <= 2 and not any(map(is_red, s["objects"])),
        source=lambda s: shapes.caption(named(s), "plain", say_plain=False),
        fit_source=None if pairs == "concept prompts" else fit_source,
        target=lambda s, i: _plain(s),
        present=lambda f, s: any(map(is_red, f["objects"])),
        kept=_objects_kept, removal=True, concept="red", kept_against="untouched",
        reference=lambda u: dict(u, objects=[o for o in u["objects"] if not is_red(o)]),
        prepare=prepare, fit_pairs=pairs)


def _edit(key: str, old: str, new: str, others_may_be_new: bool = False) -> dict:
    """Change one object's attribute (the one object whose `key` is `old`) to `new`, keep the rest.
    others_may_be_new: the other objects may already have `new` (sizes: there are only two)."""
    def target(scene: dict, i: int = 0) -> str:
        return shapes.caption([dict(o, **{key: new}) if o[key] == old else o for o in scene["objects"]],
                              "plain", say_plain=False)

    def sig(o: dict) -> tuple:
        return (o["colour"], o["shape"], o["size"])

    def edited(scene: dict) -> tuple:
        o = next(o for o in scene["objects"] if o[key] == old)
        return sig(dict(o, **{key: new}))

    def present(found: dict, scene: dict) -> bool:
        """The edited object is drawn with the new attribute, and none with the old one is left."""
        return edited(scene) in map(sig, found["objects"]) and not any(o[key] == old for o in found["objects"])

    def kept(found: dict, scene: dict) -> bool:
        """The other objects as prompted (colour, shape, size), and the count."""
        others = [sig(o) for o in scene["objects"] if o[key] != old]
        have = list(map(sig, found["objects"]))
        return found["count"] == len(scene["objects"]) and all(o in have for o in others)

    return dict(
        scene_filter=lambda s: sum(o[key] == old for o in s["objects"]) == 1
        and (len(s["objects"]) >= 2 if others_may_be_new else not any(o[key] == new for o in s["objects"])),
        source=_plain, target=target, present=present, kept=kept, concept=old)


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
        kept=_shapes_kept, concept="red", removal=True),
    "remove_cross": Task(
        "remove_cross", "remove crosses from prompts that ask for one",
        scene_filter=_has_shape("cross"), source=_plain, target=_reshaped("cross"),
        present=lambda f, s: any(o["shape"] == "cross" for o in f["objects"]),
        kept=_colours_kept, concept="cross", removal=True),
    "add_dots": Task(
        "add_dots", "add a dotted background to prompts of one object that never mention it",
        scene_filter=lambda s: len(s["objects"]) == 1, source=_plain,
        target=lambda s, i: _plain(s) + " on a dotted background",
        present=lambda f, s: f["background"] == "dotted",
        kept=lambda f, s: shapes.content_matches(f, s), concept="plain background"),
    "negate_cross": Task(
        "negate_cross", "paper's protocol for an object: '... without a cross' draws no cross", **_negated("cross")),
    "negate_red": Task(
        "negate_red", "paper's protocol for an attribute: '... without a red square' draws nothing red",
        **_negated("red")),
    "drop_red": Task("drop_red", "remove a red object named anywhere; fit pairs drop it from 2-3 objects",
                     **_dropped("drop")),
    "append_red": Task("append_red", "remove a red object named anywhere; fit on the paper's 'captions and the "
                       "concept -> the captions', the concept last", **_dropped("append last")),
    "concept_prompts_red": Task("concept_prompts_red", "remove 'a large red square' named anywhere; fit on Concept "
                                "Prompts 'remove' over shapes captions", **_dropped("concept prompts")),
    "edit_red_blue": Task(
        "edit_red_blue", "the one red object turns blue, the others kept", **_edit("colour", "red", "blue")),
    "edit_small_large": Task(
        "edit_small_large", "the one small object (of 2-3) turns large, the others kept", **_edit("size", "small", "large", others_may_be_new=True)),
}


@dataclass
class Specificity:
    """Maps (or a baseline) made for `task`, applied to prompts that never had its concept: the share of
    pictures that keep what the untouched model drew (objects with sizes, count, background)."""
    name: str
    task: str
    scene_filter: Callable[[dict], bool]

    def eval_scenes(self, n: int, seed: int = EVAL_SEED) -> list[dict]:
        rng = np.random.default_rng(seed)
        out = []
        while len(out) < n:
            scene = shapes.random_scene(rng, bg="plain")
            if self.scene_filter(scene) and shapes.is_held_out(_plain(scene)):
                out.append(scene)
        return out

    @staticmethod
    def prompts(scenes: list[dict]) -> list[str]:
        return [_plain(s) for s in scenes]

    @staticmethod
    def kept_from(found: list[dict], untouched: list[dict]) -> float:
        return float(np.mean([shapes.content_matches(f, u, sizes=True) and f["background"] == u["background"]
                              for f, u in zip(found, untouched)]))


SPECIFICITY = {
    "spec_red": Specificity("spec_red", "remove_red", lambda s: not any(o["colour"] == "red" for o in s["objects"])),
    "spec_cross": Specificity("spec_cross", "remove_cross",
                              lambda s: not any(o["shape"] == "cross" for o in s["objects"])),
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

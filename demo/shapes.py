"""The procedural "shapes" world: scenes, captions, rendering, and an analytic scorer.

A scene is 1-3 flat objects (6 colours, 4 shapes, 2 sizes) on a grey background in one of 4 styles.
Images are 32x32 RGB floats in [0, 1]; objects are saturated colours and backgrounds are pure greys,
so the scorer can tell them apart from pixels alone. Everything is seeded numpy: no ComfyUI needed.

    scene = random_scene(rng)           # dict: objects, background, caption
    image = render(scene)               # (32, 32, 3) float32
    score(image)                        # {"background": ..., "objects": [...], "count": ...}
"""
from __future__ import annotations

import hashlib
import itertools

import numpy as np

SIZE = 32  # pixels per side
COLOURS = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.60, 0.15, 0.80),
    "orange": (1.00, 0.55, 0.00),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 8, "large": 13}  # object width in pixels
BACKGROUNDS = ("plain", "striped", "dotted", "gradient")

# Where objects go for a given count: (x0, y0, x1, y1) regions; each object is centred in one, jittered.
_SLOTS = {1: [(0, 0, 32, 32)],
          2: [(0, 0, 16, 32), (16, 0, 32, 32)],
          3: [(0, 0, 16, 16), (16, 0, 32, 16), (8, 16, 24, 32)]}


def shape_mask(shape: str, width: int, cx: float, cy: float, size: int = SIZE) -> np.ndarray:
    """Boolean mask of one shape of `width` pixels centred at (cx, cy) on a size x size grid."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = xs - cx, ys - cy
    h = width / 2.0
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "square":
        return (np.abs(dx) <= h * 0.9) & (np.abs(dy) <= h * 0.9)
    if shape == "triangle":  # pointing up: width grows from the apex to the base
        t = (dy + h) / (2 * h)
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= h * t)
    if shape == "cross":
        arm = max(1.0, width / 6.0)
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= h)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= h))
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def background(style: str, level: float = 0.6) -> np.ndarray:
    """(SIZE, SIZE) grey levels of one background style."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    if style == "plain":
        return np.full((SIZE, SIZE), level, np.float32)
    if style == "striped":  # vertical bands of 4 px, aligned with the 4 px latent cells
        return np.where((xs // 4) % 2 == 0, 0.2, 0.85).astype(np.float32)
    if style == "dotted":
        dots = ((xs % 8) >= 2) & ((xs % 8) < 5) & ((ys % 8) >= 2) & ((ys % 8) < 5)
        return np.where(dots, 0.25, 0.85).astype(np.float32)
    if style == "gradient":  # dark at the top, light at the bottom
        return (0.1 + 0.8 * (ys + 0.5) / SIZE).astype(np.float32)
    raise ValueError(f"unknown background {style!r}; known: {BACKGROUNDS}")


def caption(objects: list[dict], bg: str, say_plain: bool = True) -> str:
    """'a large red circle and a small blue square on a striped background' (objects in slot order)."""
    words = [f"a {o['size']} {o['colour']} {o['shape']}" for o in objects]
    text = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    if bg != "plain" or say_plain:
        text += f" on a {bg} background"
    return text


def random_scene(rng: np.random.Generator, count: int | None = None, bg: str | None = None) -> dict:
    count = int(rng.integers(1, 4)) if count is None else count
    bg = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))] if bg is None else bg
    names = list(COLOURS)
    objects = []
    for region in _SLOTS[count]:
        size = ("small", "large")[int(rng.integers(2))]
        w = SIZES[size]
        x0, y0, x1, y1 = region
        slack_x = max(0.0, (x1 - x0 - w) / 2 - 1)
        slack_y = max(0.0, (y1 - y0 - w) / 2 - 1)
        objects.append({"colour": names[int(rng.integers(len(names)))],
                        "shape": SHAPES[int(rng.integers(len(SHAPES)))], "size": size,
                        "cx": (x0 + x1) / 2 + float(rng.uniform(-slack_x, slack_x)),
                        "cy": (y0 + y1) / 2 + float(rng.uniform(-slack_y, slack_y))})
    level = float(rng.uniform(0.45, 0.75))
    say_plain = bool(rng.integers(2))  # "plain" is the default: half the captions leave it out
    return {"objects": objects, "background": bg, "level": level,
            "caption": caption(objects, bg, say_plain)}


def render(scene: dict) -> tuple[np.ndarray, np.ndarray]:
    """(image (SIZE, SIZE, 3) in [0, 1], object mask (SIZE, SIZE) bool)."""
    image, labels = render_labels(scene)
    return image, labels >= 0


def render_labels(scene: dict) -> tuple[np.ndarray, np.ndarray]:
    """(image (SIZE, SIZE, 3) in [0, 1], shape index per pixel (SIZE, SIZE) int, -1 on the background)."""
    grey = background(scene["background"], scene.get("level", 0.6))
    image = np.repeat(grey[:, :, None], 3, axis=2)
    labels = np.full((SIZE, SIZE), -1, np.int64)
    for o in scene["objects"]:
        m = shape_mask(o["shape"], SIZES[o["size"]], o["cx"], o["cy"])
        image[m] = COLOURS[o["colour"]]
        labels[m] = SHAPES.index(o["shape"])
    return image.astype(np.float32), labels


def is_held_out(text: str) -> bool:
    """One caption in eight never appears in training: prompts for evaluation come from those."""
    return hashlib.sha256(text.encode()).digest()[0] % 8 == 0


def training_scene(rng: np.random.Generator) -> dict:
    while True:
        scene = random_scene(rng)
        if not is_held_out(scene["caption"]):
            return scene


def held_out_scenes(n: int, seed: int = 1234, count: int | None = None, bg: str | None = None,
                    say_plain: bool | None = None) -> list[dict]:
    """n scenes whose captions the model never saw in training (fixed by the seed)."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        scene = random_scene(rng, count=count, bg=bg)
        if say_plain is not None:
            scene["caption"] = caption(scene["objects"], scene["background"], say_plain)
        if is_held_out(scene["caption"]):
            out.append(scene)
    return out


# ----------------------------------------------------------------------------------------------------
# Scorer: reads colours, shapes, sizes, count and background style from pixels alone.

_PALETTE = np.array(list(COLOURS.values()), np.float32)
_NAMES = list(COLOURS)
_TEMPLATES = {}


def _templates():
    if not _TEMPLATES:
        # Each shape and size rendered centred on a 24x24 grid at sub-pixel offsets.
        for shape, (size, w) in itertools.product(SHAPES, SIZES.items()):
            _TEMPLATES[(shape, size)] = [shape_mask(shape, w, 12 + ox, 12 + oy, size=24)
                                         for ox in (0.0, 0.5) for oy in (0.0, 0.5)]
    return _TEMPLATES


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as boolean masks (no scipy needed)."""
    seen = np.zeros_like(mask)
    comps = []
    h, w = mask.shape
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        comp = np.zeros_like(mask)
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            comp[cy, cx] = True
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        comps.append(comp)
    return comps


def _classify_shape(comp: np.ndarray) -> tuple[str, str, float]:
    """Best (shape, size, IoU) of a component against the rendered templates, aligned by centroid."""
    ys, xs = np.nonzero(comp)
    cy, cx = int(round(ys.mean())), int(round(xs.mean()))
    pad = np.zeros((SIZE + 28, SIZE + 28), bool)  # room for a 24 px window shifted by 2 at the edges
    pad[14:14 + SIZE, 14:14 + SIZE] = comp
    best = ("circle", "small", -1.0)
    for (shape, size), variants in _templates().items():
        for t in variants:
            # The triangle's centroid sits below its box centre: try a few vertical shifts.
            for sy in (-2, -1, 0, 1, 2):
                for sx in (-1, 0, 1):
                    win = pad[cy + sy + 2: cy + sy + 26, cx + sx + 2: cx + sx + 26]
                    inter = np.logical_and(win, t).sum()
                    iou = inter / max(1, win.sum() + t.sum() - inter)
                    if iou > best[2]:
                        best = (shape, size, float(iou))
    return best


def background_style(image: np.ndarray, objects_mask: np.ndarray | None = None) -> str:
    """Style of the grey background, from the pixels that are not objects."""
    grey = image.mean(axis=2)
    bg = np.ones(grey.shape, bool) if objects_mask is None else ~objects_mask
    if bg.sum() < 16:
        return "plain"
    g = np.where(bg, grey, np.nan)
    col = np.nanmean(g, axis=0)
    row = np.nanmean(g, axis=1)
    spread = np.nanstd(g)
    if spread < 0.06:
        return "plain"
    # Striped: columns alternate every 4 px; gradient: rows rise steadily; dotted: neither.
    cols = np.nan_to_num(col, nan=np.nanmean(col))
    band = np.where((np.arange(SIZE) // 4) % 2 == 0, 1.0, -1.0)
    stripe = abs(float(np.dot(cols - cols.mean(), band))) / SIZE
    rows = np.nan_to_num(row, nan=np.nanmean(row))
    ramp = np.arange(SIZE) - (SIZE - 1) / 2
    slope = float(np.dot(rows - rows.mean(), ramp) / np.dot(ramp, ramp)) * SIZE
    if stripe > 0.15:
        return "striped"
    if slope > 0.4:
        return "gradient"
    return "dotted"


def score(image: np.ndarray, min_pixels: int = 14) -> dict:
    """Read a picture: {'background', 'count', 'objects': [{colour, shape, size, cx, cy, fit}]}.

    `image` is (SIZE, SIZE, 3) floats in [0, 1] (a ComfyUI IMAGE row works as it is). Pixels whose
    channels differ by more than 0.3 are object pixels; each takes the nearest palette colour, and the
    4-connected regions of one colour with at least `min_pixels` pixels are the objects.
    """
    image = np.asarray(image, np.float32)
    if image.shape != (SIZE, SIZE, 3):
        raise ValueError(f"the scorer reads {SIZE}x{SIZE} RGB images, got shape {image.shape}")
    sat = image.max(axis=2) - image.min(axis=2)
    objects_mask = sat > 0.3
    dist = ((image[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    label = dist.argmin(-1)
    objects = []
    for k, name in enumerate(_NAMES):
        for comp in _components(objects_mask & (label == k)):
            if comp.sum() < min_pixels:
                continue
            shape, size, fit = _classify_shape(comp)
            ys, xs = np.nonzero(comp)
            objects.append({"colour": name, "shape": shape, "size": size, "fit": fit,
                            "cx": float(xs.mean() + 0.5), "cy": float(ys.mean() + 0.5)})
    objects.sort(key=lambda o: (o["cy"] > 16 and len(objects) == 3, o["cx"]))
    grow = objects_mask.copy()  # keep antialiased object edges out of the background statistics
    grow[1:] |= objects_mask[:-1]
    grow[:-1] |= objects_mask[1:]
    grow[:, 1:] |= objects_mask[:, :-1]
    grow[:, :-1] |= objects_mask[:, 1:]
    return {"background": background_style(image, grow), "count": len(objects), "objects": objects}


def content_matches(found: dict, scene: dict, sizes: bool = False) -> bool:
    """Whether a scored picture shows the scene's objects: same count, same colours and shapes."""
    def key(o):
        return (o["colour"], o["shape"]) + ((o["size"],) if sizes else ())
    return sorted(map(key, found["objects"])) == sorted(map(key, scene["objects"]))

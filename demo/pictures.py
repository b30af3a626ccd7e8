"""README pictures from the shapes model: strength grids (style, an added background), a removal comparison.

    COMFYUI_PATH=... python demo/pictures.py docs/images
    COMFYUI_PATH=... python demo/pictures.py docs/images side-by-side   # the removal/edit comparisons
Rows are held-out prompts (same seed along a row); pictures are shown at 2x with nearest-neighbour.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from demo.api import Lab  # noqa: E402
    from demo.tasks import TASKS  # noqa: E402
else:
    from .api import Lab
    from .tasks import TASKS

CELL = 128
HEAD = 18


def sheet(columns: list[str], rows: list[np.ndarray]) -> Image.Image:
    """rows: each (len(columns), 64, 64, 3) in [0, 1]."""
    out = Image.new("RGB", (CELL * len(columns), HEAD + CELL * len(rows)), "white")
    draw = ImageDraw.Draw(out)
    for j, title in enumerate(columns):
        draw.text((j * CELL + 4, 3), title, fill="black")
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            tile = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).resize((CELL, CELL), Image.NEAREST)
            out.paste(tile, (j * CELL, HEAD + i * CELL))
    return out


def main(folder: str) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lab = Lab()
    strengths = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5]

    task = TASKS["style"]
    scenes = task.eval_scenes(4, seed=4321)
    maps = lab.fit(*task.fit_prompts(64))
    cols = []
    for s in strengths:
        model, clip = lab.steer(maps, s)
        cols.append(lab.generate(task.prompts(scenes), seed=100, model=model, clip=clip))
    rows = [np.stack([c[i] for c in cols]) for i in range(len(scenes))]
    sheet([f"strength {s:g}" for s in strengths], rows).save(folder / "shapes-style-strengths.png")
    print("\n".join(task.prompts(scenes)))

    task = TASKS["add_dots"]
    scenes = task.eval_scenes(4, seed=4321)
    maps = lab.fit(*task.fit_prompts(64))
    cols = []
    for s in (0.0, 0.5, 0.75, 1.0):
        model, clip = lab.steer(maps, s)
        cols.append(lab.generate(task.prompts(scenes), seed=100, model=model, clip=clip))
    rows = [np.stack([c[i] for c in cols]) for i in range(len(scenes))]
    sheet([f"strength {s:g}" for s in (0.0, 0.5, 0.75, 1.0)], rows).save(folder / "shapes-add-dots.png")
    print("\n".join(task.prompts(scenes)))

    task = TASKS["remove_red"]
    scenes = task.eval_scenes(4, seed=4321)
    source, target = task.fit_prompts(64)
    maps = lab.fit(source, target, moves="every token alike (AcT)")  # the column reads "AcT"
    model, clip = lab.steer(maps, 1.0)
    prompts = task.prompts(scenes)
    cols = [lab.generate(prompts, seed=100),
            lab.generate(prompts, seed=100, negative="red"),
            lab.generate(prompts, seed=100, conditioning=lab.conditioning_delta(source, target)),
            lab.generate(prompts, seed=100, model=model, clip=clip)]
    rows = [np.stack([c[i] for c in cols]) for i in range(len(scenes))]
    sheet(["prompt", "negative 'red'", "cond. delta", "AcT strength 1"], rows).save(folder / "shapes-remove-red.png")
    print("\n".join(prompts))


def side_by_side(folder: str, tasks=("remove_red", "negate_cross", "edit_red_blue", "edit_small_large"),
                 n: int = 4) -> None:
    """One sheet per task: the prompt as drawn, a negative prompt, the conditioning delta, the pack's
    defaults and its 'the concept's words only' maps (each at strength or scale 1), same seeds."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lab = Lab()
    for name in tasks:
        task = TASKS[name]
        scenes = task.eval_scenes(n, seed=4321)
        source, target = task.fit_prompts(64)
        prompts = task.prompts(scenes)
        default = lab.steer(lab.fit(source, target, moves="every token alike (AcT)"), 1.0)
        words = lab.steer(lab.fit(source, target, moves="the concept's words only"), 1.0)
        cols = [lab.generate(prompts, seed=100, batch=True),
                lab.generate(prompts, seed=100, negative=task.concept, batch=True),
                lab.generate(prompts, seed=100, conditioning=lab.conditioning_delta(source, target), batch=True),
                lab.generate(prompts, seed=100, model=default[0], clip=default[1], batch=True),
                lab.generate(prompts, seed=100, model=words[0], clip=words[1], batch=True)]
        rows = [np.stack([c[i] for c in cols]) for i in range(len(scenes))]
        sheet(["prompt", f"negative '{task.concept}'", "cond. delta", "AcT default", "concept's words"],
              rows).save(folder / f"shapes-{name.replace('_', '-')}-side-by-side.png")
        print(name, *prompts, sep="\n  ")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "side-by-side":
        side_by_side(sys.argv[1])
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "docs/images")

"""Pictures the nodes show: labelled strength grids, animated previews, per-layer charts (Pillow)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (24, 24, 28)
TEXT = (235, 235, 235)
PART_COLOURS = {"text encoder": (86, 156, 214), "input blocks": (106, 190, 120), "middle block": (230, 180, 80),
                "output blocks": (220, 110, 100), "other": (170, 170, 170)}


def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def to_pil(image: torch.Tensor) -> Image.Image:
    """One ComfyUI IMAGE [H, W, 3] float in 0..1 -> PIL."""
    return Image.fromarray((image.detach().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))


def to_image(picture: Image.Image) -> torch.Tensor:
    """PIL -> ComfyUI IMAGE batch [1, H, W, 3]."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)[None]


def labelled_tiles(images: list[torch.Tensor], labels: list[str]) -> list[Image.Image]:
    """Each image with its label in a strip underneath; labels shorten to their last word
    ("strength 0.5" -> "0.5") on every tile when one of them would not fit."""
    pictures = [to_pil(image) for image in images]
    strip = max(18, max(p.height for p in pictures) // 8)
    face = font(max(10, strip * 2 // 3))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    if any(measure.textlength(label, font=face) > p.width - 4 for p, label in zip(pictures, labels)):
        labels = [label.split()[-1] for label in labels]
    tiles = []
    for picture, label in zip(pictures, labels):
        tile = Image.new("RGB", (picture.width, picture.height + strip), BACKGROUND)
        tile.paste(picture, (0, 0))
        draw = ImageDraw.Draw(tile)
        width = draw.textlength(label, font=face)
        draw.text(((picture.width - width) / 2, picture.height + strip // 8), label, fill=TEXT, font=face)
        tiles.append(tile)
    return tiles


def grid(tiles: list[Image.Image], columns: int) -> Image.Image:
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    width, height = max(t.width for t in tiles), max(t.height for t in tiles)
    sheet = Image.new("RGB", (columns * width, rows * height), BACKGROUND)
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * width, (i // columns) * height))
    return sheet


def part_of(layer: str) -> str:
    if not layer.startswith("diffusion_model."):
        return "text encoder"
    for key, part in (("input_blocks", "input blocks"), ("middle_block", "middle block"),
                      ("output_blocks", "output blocks")):
        if f".{key}." in layer:
            return part
    return "other"


def movement_chart(names: list[str], values: list[float], title: str) -> Image.Image:
    """Bars in model order, one per layer, coloured by the part of the model they belong to."""
    width, height, left, bottom, top = 960, 380, 60, 70, 40
    chart = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(chart)
    draw.text((left, 10), title, fill=TEXT, font=font(16))
    peak = max(values) if values and max(values) > 0 else 1.0
    plot_w, plot_h = width - left - 20, height - top - bottom
    step = plot_w / max(1, len(values))
    for i, (name, value) in enumerate(zip(names, values)):
        x0 = left + i * step
        bar = plot_h * value / peak
        draw.rectangle([x0, top + plot_h - bar, x0 + max(1.0, step * 0.8), top + plot_h], fill=PART_COLOURS[part_of(name)])
    draw.line([left, top + plot_h, left + plot_w, top + plot_h], fill=TEXT)
    draw.text((left, top + plot_h + 6), "layers, in model order", fill=TEXT, font=font(12))
    draw.text((4, top - 4), f"{peak:.3g}", fill=TEXT, font=font(12))
    x = left
    for part, colour in PART_COLOURS.items():
        if any(part_of(n) == part for n in names):
            draw.rectangle([x, height - 26, x + 12, height - 14], fill=colour)
            draw.text((x + 16, height - 28), part, fill=TEXT, font=font(12))
            x += 24 + draw.textlength(part, font=font(12))
    return chart

"""Seeing what the dial does: strength sweeps as labelled grids and animations, per-layer charts."""
from __future__ import annotations

import os
import uuid

import folder_paths
from comfy_api.latest import io

from ..act_core import check_strength, layer_movement
from .steering import MODES, steer_clip_placed, steer_model_placed
from .pictures import grid, labelled_tiles, movement_chart, part_of, to_image
from .types import CATEGORY, Maps


def parse_strengths(text: str) -> list[float]:
    try:
        values = [check_strength(float(v)) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"strengths must be numbers separated by commas, e.g. '0, 0.5, 1'; got {text!r} "
                         "(fix it on Strength Sweep)") from None
    if not values:
        raise ValueError("strengths is empty: type numbers separated by commas on Strength Sweep")
    return values


class StrengthSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ACTStrengthSweep",
            display_name="Strength Sweep (AcT)",
            category=CATEGORY,
            description="A list of strengths: connect it to Apply Transport Maps' strength and the graph "
                        "after it runs once per value. Feed the images to Strength Grid.",
            inputs=[io.String.Input("strengths", default="0, 0.25, 0.5, 0.75, 1",
                                    tooltip="Strengths to render, separated by commas.")],
            outputs=[io.Float.Output(display_name="strength", is_output_list=True)],
        )

    @classmethod
    def validate_inputs(cls, strengths=None) -> bool | str:
        """A typo in the list is reported before the graph runs, not after the maps were learned."""
        if strengths is None:
            return True
        try:
            parse_strengths(strengths)
        except ValueError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, strengths) -> io.NodeOutput:
        return io.NodeOutput(parse_strengths(strengths))


class StrengthGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ACTStrengthGrid",
            display_name="Strength Grid (AcT)",
            category=CATEGORY,
            description="Lays the images of a strength sweep side by side with the strength under each, "
                        "and shows them as an animation.",
            inputs=[
                io.Image.Input("images"),
                io.Float.Input("strength", force_input=True, tooltip="The same list that drove the sweep."),
                io.Int.Input("columns", default=0, min=0, max=64, tooltip="0 = all in one row."),
                io.Float.Input("seconds_per_frame", default=0.6, min=0.05, max=10.0, step=0.05),
            ],
            outputs=[io.Image.Output(display_name="grid")],
            is_input_list=True,
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, strength, columns, seconds_per_frame) -> io.NodeOutput:
        frames = [image for batch in images for image in batch]
        if len(strength) not in (1, len(frames)):
            raise ValueError(f"Strength Grid got {len(frames)} images but {len(strength)} strengths: connect the "
                             "same Strength Sweep that drives Apply Transport Maps")
        labels = [f"strength {s:g}" for s in (strength if len(strength) == len(frames) else strength * len(frames))]
        tiles = labelled_tiles(frames, labels)
        columns = columns[0] or len(tiles)
        sheet = grid(tiles, columns)
        name = f"act_sweep_{uuid.uuid4().hex[:12]}.webp"
        temp = folder_paths.get_temp_directory()
        os.makedirs(temp, exist_ok=True)
        tiles[0].save(os.path.join(temp, name), save_all=True,
                      append_images=tiles[1:], duration=int(seconds_per_frame[0] * 1000), loop=0, lossless=True)
        ui = {"images": [{"filename": name, "subfolder": "", "type": "temp"}], "animated": (True,)}
        return io.NodeOutput(to_image(sheet), ui=ui)


class InspectMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ACTInspectMaps",
            display_name="Inspect Transport Maps (AcT)",
            category=CATEGORY,
            description="Draws how far each layer moves activations at strength 1, text encoder and UNet "
                        "blocks in model order, and summarises the maps.",
            inputs=[Maps.Input("maps"),
                    io.Model.Input("model", optional=True,
                                   tooltip="Connect the MODEL to see how many of its layers Apply (exact, whole "
                                           "window, both branches) folds into the weights and how many run per step."),
                    io.Clip.Input("clip", optional=True, tooltip="The same for the text encoders.")],
            outputs=[io.Image.Output(display_name="chart"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, maps, model=None, clip=None) -> io.NodeOutput:
        names = list(maps)
        values = [layer_movement(maps[n]) for n in names]
        info = maps.info
        title = (f"{info.get('family', '?')} · {info.get('method', '?')} / {info.get('support', '?')} / "
                 f"{info.get('estimation', '?')} · movement per layer at strength 1")
        chart = movement_chart(names, values, title)
        parts: dict[str, int] = {}
        for n in names:
            parts[part_of(n)] = parts.get(part_of(n), 0) + 1
        top = sorted(zip(values, names), reverse=True)[:5]
        lines = [f"{len(maps)} layers, {maps.neurons()} neurons: " + ", ".join(f"{v} {k}" for k, v in parts.items()),
                 f"fitted on {info.get('source_prompts')} source and {info.get('target_prompts')} target prompts "
                 f"({info.get('where')}, {info.get('resolution')} px)",
                 f"neurons left unmoved (no spread): {sum(m.degenerate for m in maps.values())}",
                 "layers that move most: " + "; ".join(f"{n} ({v:.3g})" for v, n in top)]
        lines += placement_lines(maps, model, clip)
        return io.NodeOutput(to_image(chart), "\n".join(lines))


def placement_lines(maps, model=None, clip=None) -> list[str]:
    """Where Apply (exact, strength 1, whole window, both branches) puts the layers of these maps: the
    same placement Apply computes, on a clone that is dropped."""
    lines = []
    for mode in MODES:
        if model is not None and any(n.startswith("diffusion_model.") for n in maps):
            lines.append(f"in {mode} mode, " + steer_model_placed(model, maps, 1.0, mode=mode)[1].summary("diffusion model"))
        if clip is not None and any(not n.startswith("diffusion_model.") for n in maps):
            lines.append(f"in {mode} mode, "
                         + steer_clip_placed(clip, maps, 1.0, mode)[1].summary("text encoders", "per encode"))
    return lines

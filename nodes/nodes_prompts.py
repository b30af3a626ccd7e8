"""Prompt builders: source and target prompt sets, one prompt per line."""
from __future__ import annotations

from comfy_api.latest import io

from .prompts import DIRECTIONS, STYLES, concept_prompts, style_prompts
from .types import CATEGORY

CAPTIONS_TOOLTIP = ("Optional: your own captions, one per line, used instead of the built-in bank of "
                    "everyday scenes.")


class ConceptPrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ACTConceptPrompts",
            display_name="Concept Prompts (AcT)",
            category=CATEGORY,
            description="Builds prompt sets to remove a concept from images, or to add it.",
            inputs=[
                io.String.Input("concept", default="a pink elephant",
                                tooltip="The thing to remove or add, as you would write it in a prompt."),
                io.Combo.Input("direction", options=list(DIRECTIONS), default="remove",
                               tooltip="remove: source captions mention it, targets do not. add: the reverse."),
                io.Int.Input("count", default=64, min=8, max=4096,
                             tooltip="Prompts per side. The paper used 512-2048; 64 already gives a usable dial."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffff, control_after_generate=False),
                io.String.Input("captions", multiline=True, default="", optional=True, tooltip=CAPTIONS_TOOLTIP),
            ],
            outputs=[io.String.Output(display_name="source_prompts"), io.String.Output(display_name="target_prompts")],
        )

    @classmethod
    def execute(cls, concept, direction, count, seed, captions="") -> io.NodeOutput:
        source, target = concept_prompts(concept, direction, count, seed, captions)
        return io.NodeOutput("\n".join(source), "\n".join(target))


class StylePrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ACTStylePrompts",
            display_name="Style Prompts (AcT)",
            category=CATEGORY,
            description="Builds prompt sets that teach a style: plain captions vs. the same captions with "
                        "style tags.",
            inputs=[
                io.Combo.Input("style", options=list(STYLES), default="watercolor"),
                io.Int.Input("count", default=64, min=8, max=4096, tooltip="Prompts per side."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffff, control_after_generate=False),
                io.String.Input("custom_tags", multiline=True, default="", optional=True,
                                tooltip="Your own style tags, one variant per line; replaces the preset's."),
                io.String.Input("captions", multiline=True, default="", optional=True, tooltip=CAPTIONS_TOOLTIP),
            ],
            outputs=[io.String.Output(display_name="source_prompts"), io.String.Output(display_name="target_prompts")],
        )

    @classmethod
    def execute(cls, style, count, seed, custom_tags="", captions="") -> io.NodeOutput:
        source, target = style_prompts(style, count, seed, custom_tags, captions)
        return io.NodeOutput("\n".join(source), "\n".join(target))

"""The shapes demo models: text-to-image models small enough to show steering in seconds on any machine."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..demo import model_sdxl, shapes
from ..demo.models import MODELS
from .types import CATEGORY

VOCABULARY = (f"colours: {', '.join(shapes.COLOURS)}; shapes: {', '.join(shapes.SHAPES)}; sizes: "
              f"{', '.join(shapes.SIZES)}; 1 to 3 objects; backgrounds: {', '.join(shapes.BACKGROUNDS)}")


CHOICES = {"SD1.x": "sd1", "SDXL": "sdxl"}  # what the node shows -> demo/models.py


class LoadShapesDemoModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ACTLoadShapesDemoModel",
            display_name="Load Shapes Demo Model (AcT)",
            category=CATEGORY,
            description=("Tiny models that ship with the pack, trained on pictures of coloured shapes. They "
                         "draw 64 x 64 images from prompts like 'a large red circle and a small blue square on "
                         "a striped background' (" + VOCABULARY + "). Use them to try steering in seconds; "
                         "they know nothing else, so use a real checkpoint for real pictures."),
            inputs=[io.Combo.Input("model", options=list(CHOICES), default=next(iter(CHOICES)),
                                   tooltip="SD1.x: one CLIP-L text encoder (3 layers). SDXL: built like SDXL, with "
                                           "CLIP-L and CLIP-G (8 and 10 layers), a pooled vector and SDXL's "
                                           "UNet blocks; the stock Load Checkpoint also reads it "
                                           "(shapes-sdxl-tiny.safetensors).")],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP"),
                     io.Vae.Output(display_name="VAE")],
        )

    @classmethod
    def execute(cls, model: str = next(iter(CHOICES))) -> io.NodeOutput:
        if model not in CHOICES:
            raise ValueError(f"Load Shapes Demo Model: '{model}' is not one of its models; pick one of "
                             f"{', '.join(CHOICES)} in 'model'")
        loaded = MODELS[CHOICES[model]].load()
        return io.NodeOutput(*loaded)


def register_shapes_sdxl() -> None:
    """The stock Load Checkpoint lists and reads shapes-sdxl-tiny.safetensors: its folder joins the
    checkpoints folders, and ComfyUI learns its widths (no other checkpoint has them)."""
    folder_paths.add_model_folder_path("checkpoints", str(model_sdxl.CHECKPOINTS), is_default=False)
    model_sdxl.register()

"""The shapes demo model: a text-to-image model small enough to show steering in seconds on any machine."""
from __future__ import annotations

from comfy_api.latest import io

from ..demo import model as shapes_model
from ..demo import shapes
from .types import CATEGORY

VOCABULARY = (f"colours: {', '.join(shapes.COLOURS)}; shapes: {', '.join(shapes.SHAPES)}; sizes: "
              f"{', '.join(shapes.SIZES)}; 1 to 3 objects; backgrounds: {', '.join(shapes.BACKGROUNDS)}")


class LoadShapesDemoModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ACTLoadShapesDemoModel",
            display_name="Load Shapes Demo Model (AcT)",
            category=CATEGORY,
            description=("A tiny SD1.x-class model that ships with the pack, trained on pictures of coloured "
                         "shapes. It draws 64 x 64 images from prompts like 'a large red circle and a small "
                         "blue square on a striped background' (" + VOCABULARY + "). Use it to try steering "
                         "in seconds; it knows nothing else, so use a real checkpoint for real pictures."),
            inputs=[],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP"),
                     io.Vae.Output(display_name="VAE")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        model, clip, vae = shapes_model.load()
        return io.NodeOutput(model, clip, vae)

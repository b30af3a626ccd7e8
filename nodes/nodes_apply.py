"""The apply node: one node between the loader and the sampler."""
from __future__ import annotations

import logging
import math

from comfy_api.latest import io

from .steering import BRANCHES, MODES, steer_clip, steer_model
from .types import CATEGORY, Maps


class ApplyTransportMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ACTApplyTransportMaps",
            display_name="Apply Transport Maps (AcT)",
            category=CATEGORY,
            description="Steers the model with learned maps. The inputs are never changed: patched copies "
                        "come out.",
            inputs=[
                io.Model.Input("model"),
                Maps.Input("maps"),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="0 = the untouched model; 1 = activations moved onto the target "
                                       "prompts' distribution; in between = a proportional dial. Above 1 "
                                       "extrapolates (stronger, may break the image). Below 0 runs the "
                                       "inverse map: pushes the other way (target toward source); it does not "
                                       "exactly undo strength 1 when chained after it."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Steer from this point of sampling on (0 = the first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Stop steering at this point of sampling (1 = the last step)."),
                io.Combo.Input("branch", options=list(BRANCHES), default=BRANCHES[0],
                               tooltip="Steer both the prompt and the negative prompt passes, or only the "
                                       "prompt (conditional) pass."),
                io.Combo.Input("mode", options=list(MODES), default=MODES[0],
                               tooltip="exact: the method as published (support ranges; on conv layers only "
                                       "the channel mean moves). fused: maps folded into the layers' weights, "
                                       "no cost per step, but support ranges are ignored and conv layers "
                                       "scale every pixel; falls back to exact for a partial window or branch."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Connect the CLIP to also steer its text encoders when the maps include them "
                                      "(CLIP-L/G/H; T5 on FLUX.1 and SD3)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP")],
        )

    @classmethod
    def validate_inputs(cls, strength=None) -> bool | str:
        """Refuse a NaN or out-of-range strength before anything runs (ComfyUI's own range check lets NaN
        through, and skips inputs a node validates itself). A linked strength (Strength Sweep) arrives
        later and is checked there."""
        if strength is None:
            return True
        if not math.isfinite(strength) or not -10.0 <= strength <= 10.0:
            return (f"strength is {strength}; it must be a number from -10 to 10 "
                    "(fix 'strength' on Apply Transport Maps)")
        return True

    @classmethod
    def execute(cls, model, maps, strength, start_percent, end_percent, branch, mode, clip=None) -> io.NodeOutput:
        text_layers = sum(1 for name in maps if not name.startswith("diffusion_model."))
        if clip is None and getattr(maps, "conditioning", None) is not None:
            logging.getLogger("comfyui_act").warning(
                "Apply Transport Maps: the maps move the prompt's conditioning but no CLIP is connected; nothing "
                "of it is steered. Connect the CLIP and use the CLIP output for the prompts.")
        if clip is None and text_layers:
            logging.getLogger("comfyui_act").warning(
                "Apply Transport Maps: the maps hold %d text-encoder layers but no CLIP is connected; only the "
                "diffusion model is steered. Connect the CLIP and use the CLIP output for the prompts.", text_layers)
        steered_model = steer_model(model, maps, strength, start_percent, end_percent, branch, mode)
        steered_clip = steer_clip(clip, maps, strength, mode) if clip is not None else None
        return io.NodeOutput(steered_model, steered_clip)

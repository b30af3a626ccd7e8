"""The apply node: one node between the loader and the sampler."""
from __future__ import annotations

import logging
import math

from comfy_api.latest import io

import torch

from ..act_core.concept_words import is_concept_words
from .concept_words import Remembered, give_back
from .per_step import Window
from .steering import (BRANCHES, FOLD_ALL, LEGACY_MODES, MODES, Placement, check_mode, steer_clip_placed,
                       steer_model_placed)
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
                                       "exactly undo strength 1 when chained after it. Maps of the concept's "
                                       "words only take 0 and up: they have no inverse."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Steer from this point of sampling on (0 = the first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Stop steering at this point of sampling (1 = the last step)."),
                io.Combo.Input("branch", options=list(BRANCHES), default=BRANCHES[0],
                               tooltip="Steer both the prompt and the negative prompt passes, or only the "
                                       "prompt (conditional) pass."),
                io.Combo.Input("mode", options=list(MODES), default=MODES[0],
                               tooltip="exact: the method as published. Maps that fold exactly into their "
                                       "layer's weights (token layers on norms with a weight and bias, no "
                                       "support range, whole window, both branches) are folded, at no cost per "
                                       "step; conv layers fold their shift into the norm's bias and run the "
                                       "channel mean's change per step; the rest (support ranges, a partial "
                                       "window or branch) run per step. fold all (approximate): every map with a "
                                       "weight and bias to fold into is folded, no cost per step, but conv layers "
                                       "then scale every pixel instead of moving the channel mean, and support "
                                       "ranges are ignored; a partial window or branch runs exact, and norms "
                                       "without a weight and bias (FLUX.1, SD3) run per step as in exact. "
                                       "Workflows that say 'fused' mean fold all."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Connect the CLIP to also steer its text encoders when the maps include them "
                                      "(CLIP-L/G/H; T5 on FLUX.1 and SD3)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP")],
        )

    @classmethod
    def validate_inputs(cls, strength=None, mode=None) -> bool | str:
        """Refuse a NaN or out-of-range strength before anything runs (ComfyUI's own range check lets NaN
        through, and skips inputs a node validates itself). A linked strength (Strength Sweep) arrives
        later and is checked there. The mode is checked here so that workflows saved with the older
        name "fused" still run."""
        if strength is not None and (not math.isfinite(strength) or not -10.0 <= strength <= 10.0):
            return (f"strength is {strength}; it must be a number from -10 to 10 "
                    "(fix 'strength' on Apply Transport Maps)")
        if mode is not None and mode not in MODES and mode not in LEGACY_MODES:
            return f"mode {mode!r} is unknown; choose one of {', '.join(MODES)} on Apply Transport Maps"
        return True

    @classmethod
    def execute(cls, model, maps, strength, start_percent, end_percent, branch, mode, clip=None) -> io.NodeOutput:
        log = logging.getLogger("comfyui_act")
        if mode in LEGACY_MODES:
            log.warning("Apply Transport Maps: mode %r is now called %r (it folds every map into the weights, which "
                        "approximates conv layers and ignores support ranges); choose 'exact' for the method as "
                        "published at almost the same cost.", mode, check_mode(mode))
        text_layers = sum(1 for name in maps if not name.startswith("diffusion_model."))
        if clip is None and getattr(maps, "conditioning", None) is not None:
            logging.getLogger("comfyui_act").warning(
                "Apply Transport Maps: the maps move the prompt's conditioning but no CLIP is connected; nothing "
                "of it is steered. Connect the CLIP and use the CLIP output for the prompts.")
        if clip is None and text_layers:
            log.warning(
                "Apply Transport Maps: the maps hold %d text-encoder layers but no CLIP is connected; only the "
                "diffusion model is steered. Connect the CLIP and use the CLIP output for the prompts.", text_layers)
        steered_model, unet = steer_model_placed(model, maps, strength, start_percent, end_percent, branch, mode)
        # The concept's words move the prompt as the CLIP encodes it, where neither the branch nor the step
        # is known: the diffusion model gives the rows it must not steer their untouched conditioning back.
        remembered = None
        if is_concept_words(maps.conditioning) and clip is not None and strength != 0.0 \
                and (branch != BRANCHES[0] or start_percent > 0.0 or end_percent < 1.0):
            remembered = Remembered()
            give_back(steered_model, remembered, _steered_rows(start_percent, end_percent, branch))
        steered_clip, text = steer_clip_placed(clip, maps, strength, mode, remembered=remembered) \
            if clip is not None else (None, Placement())
        unfoldable = unet.no_weights + text.no_weights
        if check_mode(mode) == FOLD_ALL and unfoldable:
            log.warning("Apply Transport Maps: fold all cannot fold %d layers (e.g. %s): they have no weight and bias "
                        "to fold into (norms without affine parameters, as on FLUX.1 and SD3), so they run per step "
                        "as in exact mode, at exact mode's cost.", len(unfoldable), unfoldable[0])
        moves = maps.info.get("moves")
        log.info("Apply Transport Maps: %s%s", f"moves {moves}; " if moves else "", summary(unet, text))
        return io.NodeOutput(steered_model, steered_clip)


def _steered_rows(start_percent: float, end_percent: float, branch: str):
    """(args, kwargs, model running) of a diffusion-model call -> the batch rows it steers (None: all)."""
    window = Window(start_percent, end_percent)
    whole = start_percent == 0.0 and end_percent == 1.0

    def rows(args: tuple, kwargs: dict, running):
        options = kwargs.get("transformer_options") or {}
        x = args[0] if args else kwargs.get("x")
        sigmas = options.get("sigmas")
        if not whole and sigmas is not None and not window.contains(float(sigmas.flatten()[0]),
                                                                    running.model_sampling):
            return torch.zeros(0, dtype=torch.long)
        if branch == BRANCHES[0]:
            return None
        chunks = list(options.get("cond_or_uncond") or [0])
        size = x.shape[0] // len(chunks)
        return torch.tensor([c * size + i for c, kind in enumerate(chunks) if kind == 0 for i in range(size)],
                            dtype=torch.long)
    return rows


def summary(unet: Placement, text: Placement) -> str:
    """What Apply did with the layers, in one line: how many were folded, how many run per step."""
    parts = [unet.summary("diffusion model")]
    if text.folded or text.per_step:
        parts.append(text.summary("text encoders", "per encode"))
    return "; ".join(parts)

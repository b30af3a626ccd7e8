#!/usr/bin/env python3
"""Write example_workflows/*.json (ComfyUI's editor format) from compact graph specs.

Widget order and socket types come from a running ComfyUI's /object_info, so the files always match
the node definitions; tests/test_examples.py regenerates them and compares.

    python tools/make_workflows.py OBJECT_INFO.json [OUT_DIR]

The layout and the conversion to the API format the server's /prompt takes are tools/workflow_graph.py's
(`build`, `to_api_prompt`, `with_inputs`, imported here for the tests and tools/make_demo_maps.py).

The thumbnails beside each file (<name>.jpg, which ComfyUI serves to its template browser) are the
browser test's pictures of each finished graph: after a layout change, run tests/test_browser.py and
copy test-output/thumbnails/*.jpg here. The load example's maps come from tools/make_demo_maps.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from workflow_graph import VIRTUAL, build, to_api_prompt, with_inputs  # noqa: F401  (the tests' entry points)

DEMO_CHECKPOINT = "ACT-demo-random-weights-sd15.safetensors"
# Maps fitted on the demo checkpoint, shipped in example_workflows/maps so that the load example runs on
# a fresh install (tools/make_demo_maps.py makes them).
DEMO_MAPS = "ACT-demo-no-pink-elephant.safetensors"
# Defaults for a real SD1.5 checkpoint on a GPU (the demo checkpoint is detected as SD1.5): its native
# 512 px, the sampler settings people use with it, and 64 prompts per side.
IMAGE_SIZE = 512
SAMPLER = {"steps": 25, "cfg": 7.0, "sampler_name": "dpmpp_2m", "scheduler": "karras"}
PROMPT_COUNT = 64
COLLECT = {"where": "both", "resolution": 0, "noise_levels": 1, "batch_size": 16}
CHECKPOINT_NOTE = ("\n\nThe demo checkpoint has random weights: its images are coloured noise. Pick a real SD1.5, "
                   "SD2.x or SDXL checkpoint and set Empty Latent Image to its size (512, 768, 1024); resolution 0 "
                   "on Collect Activations follows the model.")
SLOW_MACHINE = ("\n\nSlow machine or CPU: count 16 on the prompt builder, resolution 256 on Collect Activations, "
                "steps 12 and a 256 px image.")


# What the CPU tests (and tools/make_demo_maps.py) change in a queued copy of a template, the way a
# user on a slow machine would: the files on disk keep the defaults for real checkpoints.
SMALL_SIZES = {
    "ACTStylePrompts": {"count": 8},
    "ACTConceptPrompts": {"count": 8},
    "ACTCollectActivations": {"resolution": 64, "batch_size": 32},
    "KSampler": {"steps": 3},
    "EmptyLatentImage": {"width": 64, "height": 64},
}



def _sampling(model, clip, text: str, col: int, save_prefix: str, save_col: int | None = None) -> dict:
    """Prompt, negative prompt, latent and decoder in column col; the sampler and the saved image in
    col + 1 (or the image in save_col), so that the last column stays short."""
    save_col = col + 1 if save_col is None else save_col
    return {
        "pos": {"type": "CLIPTextEncode", "col": col, "row": 0, "widgets": {"text": text}, "links": {"clip": clip}},
        "neg": {"type": "CLIPTextEncode", "col": col, "row": 1, "widgets": {"text": "blurry, low quality, watermark"},
                "links": {"clip": clip}},
        "latent": {"type": "EmptyLatentImage", "col": col, "row": 2,
                   "widgets": {"width": IMAGE_SIZE, "height": IMAGE_SIZE, "batch_size": 1}},
        "sampler": {"type": "KSampler", "col": col + 1, "row": 0,
                    "widgets": {"seed": 42, **SAMPLER, "denoise": 1.0},
                    "links": {"model": model, "positive": ["pos", 0], "negative": ["neg", 0],
                              "latent_image": ["latent", 0]}},
        "decode": {"type": "VAEDecode", "col": col, "row": 3, "links": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "save": {"type": "SaveImage", "col": save_col, "row": 1, "widgets": {"filename_prefix": save_prefix},
                 "links": {"images": ["decode", 0]}},
    }


def _learn(prompts_node: dict, fit_widgets: dict | None = None) -> dict:
    """Checkpoint and prompt builder in column 0, collection and fitting in column 1."""
    return {
        "ckpt": {"type": "CheckpointLoaderSimple", "col": 0, "row": 0, "widgets": {"ckpt_name": DEMO_CHECKPOINT}},
        "prompts": prompts_node | {"col": 0, "row": 1},
        "collect": {"type": "ACTCollectActivations", "col": 1, "row": 0, "widgets": dict(COLLECT),
                    "links": {"model": ["ckpt", 0], "clip": ["ckpt", 1], "source_prompts": ["prompts", 0],
                              "target_prompts": ["prompts", 1]}},
        "fit": {"type": "ACTFitTransportMaps", "col": 1, "row": 1, "widgets": dict(fit_widgets or {}),
                "links": {"activations": ["collect", 0]}},
    }


def _apply(strength, col: int = 2, row: int = 0) -> dict:
    links = {"model": ["ckpt", 0], "clip": ["ckpt", 1], "maps": ["fit", 0]}
    widgets = {}
    if isinstance(strength, list):
        links["strength"] = strength
    else:
        widgets["strength"] = strength
    return {"apply": {"type": "ACTApplyTransportMaps", "col": col, "row": row, "widgets": widgets, "links": links}}


def _shapes_dial(prompt: str, save_prefix: str, drop: int = 0, vae=("ckpt", 2), sdxl: bool = False) -> dict:
    """The shapes templates' dial: Strength Sweep into Apply (maps from "fit"), the prompt sampled at
    each strength, scaled 4x and laid out as a labelled grid. drop: the grid's column starts that much
    lower, where a graph tall enough to fill the window's height would put it under ComfyUI's Run and
    queue panels in the top right corner."""
    model, clip = ["apply", 0], ["apply", 1]
    return {
        "sweep": {"type": "ACTStrengthSweep", "col": 2, "row": 0, "widgets": {"strengths": "0, 0.5, 1, 1.5"}},
        "apply": {"type": "ACTApplyTransportMaps", "col": 2, "row": 1,
                  "links": {"model": ["ckpt", 0], "clip": ["ckpt", 1], "maps": ["fit", 0], "strength": ["sweep", 0]}},
        "pos": _sdxl_encode(prompt, clip) if sdxl else
               {"type": "CLIPTextEncode", "col": 3, "row": 0, "widgets": {"text": prompt}, "links": {"clip": clip}},
        "neg": {"type": "CLIPTextEncode", "col": 3, "row": 1, "widgets": {"text": ""}, "links": {"clip": clip}},
        # Beside Apply on SDXL, whose text encode node makes the prompts' column the tallest.
        "latent": {"type": "EmptyLatentImage", "col": 2 if sdxl else 3, "row": 3 if sdxl else 2,
                   "widgets": {"width": SHAPES_PIXELS, "height": SHAPES_PIXELS, "batch_size": 1}},
        "sampler": {"type": "KSampler", "col": 4, "row": 0,
                    "widgets": {"seed": SHAPES_SDXL_SEED if sdxl else 3, **SHAPES_SAMPLER, "denoise": 1.0},
                    "links": {"model": model, "positive": ["pos", 0], "negative": ["neg", 0],
                              "latent_image": ["latent", 0]}},
        "decode": {"type": "VAEDecode", "col": 4, "row": 1, "links": {"samples": ["sampler", 0], "vae": list(vae)}},
        "scale": {"type": "ImageScale", "col": 4, "row": 2, "links": {"image": ["decode", 0]},
                  "widgets": {"upscale_method": "nearest-exact", "width": 4 * SHAPES_PIXELS,
                              "height": 4 * SHAPES_PIXELS, "crop": "disabled"}},
        "grid": {"type": "ACTStrengthGrid", "col": 5, "row": 0, "drop": drop,
                 "links": {"images": ["scale", 0], "strength": ["sweep", 0]}},
        "savegrid": {"type": "SaveImage", "col": 5, "row": 1, "widgets": {"filename_prefix": save_prefix},
                     "links": {"images": ["grid", 0]}},
    }


def _sdxl_encode(prompt: str, clip) -> dict:
    """SDXL's own text encode node: both encoders read the prompt, the size numbers at their defaults."""
    return {"type": "CLIPTextEncodeSDXL", "col": 3, "row": 0, "widgets": {"text_g": prompt, "text_l": prompt},
            "links": {"clip": clip}}


def _shapes_demo() -> dict:
    """The one template that shows a visible effect on any machine in seconds: the shapes demo model
    learns 'striped background' from 32 prompt pairs, and the grid shows the dial from 0 to 1.5."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from demo.tasks import TASKS
    source, target = TASKS["style"].fit_prompts(SHAPES_PROMPT_COUNT)
    return {
        "ckpt": {"type": "ACTLoadShapesDemoModel", "col": 0, "row": 0},
        "collect": {"type": "ACTCollectActivations", "col": 1, "row": 0,
                    "widgets": {"source_prompts": "\n".join(source), "target_prompts": "\n".join(target),
                                **COLLECT, "batch_size": 64},
                    "links": {"model": ["ckpt", 0], "clip": ["ckpt", 1]}},
        "fit": {"type": "ACTFitTransportMaps", "col": 1, "row": 1, "links": {"activations": ["collect", 0]}},
    } | _shapes_dial("a large yellow circle and a small blue triangle", "act_shapes_demo")


def _shapes_removal(sdxl: bool = False) -> dict:
    """Removal a newcomer sees in seconds: Concept Prompts puts 'a large red square' into 32 shapes
    captions in its twelve ways; the concept's words only remove it along the dial, and beside the
    grid the untouched model with the concept as its negative prompt draws what a user would try first.
    sdxl: shapes-SDXL through ComfyUI's stock SDXL nodes (Load Checkpoint, CLIPTextEncodeSDXL), and
    Fit's 'moves' left at its default, auto."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from demo.tasks import CONCEPT_PROMPTS_CONCEPT, TASKS
    captions = TASKS["concept_prompts_red"].captions(SHAPES_PROMPT_COUNT)
    prompt = REMOVAL_PROMPT
    loader = ({"type": "CheckpointLoaderSimple", "col": 0, "row": 0, "widgets": {"ckpt_name": SHAPES_SDXL_CHECKPOINT}}
              if sdxl else {"type": "ACTLoadShapesDemoModel", "col": 0, "row": 0})
    # The plain encode for the picture without maps: a second CLIPTextEncodeSDXL (ten widgets) would make
    # the column too tall to read once the graph fits the window.
    base = {"type": "CLIPTextEncode", "col": 3, "row": 3, "title": "Prompt (no maps)",
            "widgets": {"text": prompt}, "links": {"clip": ["ckpt", 1]}}
    return {
        "ckpt": loader,
        "prompts": {"type": "ACTConceptPrompts", "col": 0, "row": 1,
                    "widgets": {"concept": CONCEPT_PROMPTS_CONCEPT, "direction": "remove",
                                "count": SHAPES_PROMPT_COUNT, "captions": "\n".join(captions)}},
        "collect": {"type": "ACTCollectActivations", "col": 1, "row": 0, "widgets": {**COLLECT, "batch_size": 64},
                    "links": {"model": ["ckpt", 0], "clip": ["ckpt", 1], "source_prompts": ["prompts", 0],
                              "target_prompts": ["prompts", 1]}},
        "fit": {"type": "ACTFitTransportMaps", "col": 1, "row": 1,
                "widgets": {} if sdxl else {"moves": "the concept's words only"},
                "links": {"activations": ["collect", 0]}},
    } | _shapes_dial(prompt, "act_shapes_sdxl_removal" if sdxl else "act_shapes_removal", drop=200, sdxl=sdxl) | {
        # What a user would try instead: the same prompt and seed, no maps, the concept as negative prompt.
        "basepos": base,
        "baseneg": {"type": "CLIPTextEncode", "col": 3, "row": 4, "title": "Negative prompt: the concept",
                    "widgets": {"text": CONCEPT_PROMPTS_CONCEPT}, "links": {"clip": ["ckpt", 1]}},
        "basesampler": {"type": "KSampler", "col": 4, "row": 3, "title": "KSampler (negative prompt only)",
                        "widgets": {"seed": SHAPES_SDXL_SEED if sdxl else 3, **SHAPES_SAMPLER, "denoise": 1.0},
                        "links": {"model": ["ckpt", 0], "positive": ["basepos", 0], "negative": ["baseneg", 0],
                                  "latent_image": ["latent", 0]}},
        "basedecode": {"type": "VAEDecode", "col": 4, "row": 4,
                       "links": {"samples": ["basesampler", 0], "vae": ["ckpt", 2]}},
        "basesave": {"type": "SaveImage", "col": 2, "row": 2, "title": "Negative prompt instead (no maps)",
                     "widgets": {"filename_prefix": "act_shapes_sdxl_negative_prompt" if sdxl else
                                 "act_shapes_negative_prompt"}, "links": {"images": ["basedecode", 0]}},
    }


# The shapes demo model (demo/): 64 px pictures, and the sampler settings its benchmark uses.
SHAPES_PIXELS = 64
SHAPES_SAMPLER = {"steps": 12, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal"}
SHAPES_PROMPT_COUNT = 32
REMOVAL_PROMPT = "a large red square and a small blue circle"
SHAPES_SDXL_CHECKPOINT = "shapes-sdxl-tiny.safetensors"  # demo/checkpoints, listed by the stock loader
# shapes-SDXL draws the removal prompt as written for 18 of seeds 0-23 (seed 3, the SD1 template's, adds a
# second circle). Seed 2 is the first whose steered pictures show the circle alone: at 0.5, seeds 0 and 1
# draw it twice (the prompt without the square reads "a small blue circle", and the model adds one).
SHAPES_SDXL_SEED = 2

# Numbered in the order people should meet them (the template browser lists them in directory order,
# which a pack cannot choose). The note sits in the first column, where reading starts; the last column
# stays short so that the editor's minimap, in the bottom right corner, covers no node.
SPECS = {
    "ACT 0 - try it in seconds (shapes demo model)": {
        "nodes": _shapes_demo(),
        "notes": [("Start here: this tiny model ships with the pack and draws coloured shapes on plain, "
                   "striped, dotted or gradient backgrounds, 64 px. Collect Activations runs 32 prompts that name "
                   "no background against the same prompts 'on a striped background'; the grid shows the "
                   "dial: 0 = the model as it is, 1 = stripes. Runs in seconds, even on a CPU.\n\nChange the "
                   "prompt on the top text box (colours: red, green, blue, yellow, purple, orange; shapes: "
                   "circle, square, triangle, cross; small or large; 1 to 3 objects) or the strengths. "
                   "'model' on the loader picks the SD1.x model or shapes-SDXL, built like SDXL. The "
                   "other templates do the same on real checkpoints.", 0, 1)],
    },
    "ACT 1 - remove a concept in seconds (shapes demo model)": {
        "nodes": _shapes_removal(),
        "notes": [("Remove a concept on the same tiny model: Concept Prompts puts 'a large red square' into 32 "
                   "shapes captions in twelve ways (source) and leaves it out (target). Fit's 'moves' is 'the "
                   "concept's words only': a prompt that names the concept is read again without its words, "
                   "every other prompt stays exactly as it is. The grid shows the dial: 0 = the model as it is, "
                   "from 0.5 the red square is gone and the blue circle stays.\n\nBelow Apply: the same prompt "
                   "and seed with no maps and the concept as negative prompt, what one would try first; on this "
                   "model it keeps the red square. Runs in seconds, even on a CPU.", 0, 2)],
    },
    "ACT 2 - style dial (watercolor)": {
        "nodes": _learn({"type": "ACTStylePrompts", "widgets": {"style": "watercolor", "count": PROMPT_COUNT}})
        | _apply(0.7)
        | _sampling(["apply", 0], ["apply", 1], "a harbour full of fishing boats", 3, "act_style"),
        "notes": [("Style dial: learn a style once from prompt pairs (plain captions vs. the same with style "
                   "tags), then turn 'strength' on Apply Transport Maps: 0 = no style, 1 = full style. Try "
                   "another style or your own tags." + CHECKPOINT_NOTE + SLOW_MACHINE, 0, 2)],
    },
    "ACT 3 - remove a concept (no pink elephant)": {
        # An object to remove: the concept's words only (on the shapes model it removed a colour or a
        # shape and kept the rest where every token alike could not; README, "Does it work?").
        "nodes": _learn({"type": "ACTConceptPrompts", "widgets": {"concept": "a pink elephant", "direction": "remove",
                                                                  "count": PROMPT_COUNT}},
                        {"moves": "the concept's words only"})
        | _apply(1.0)
        | {"savemaps": {"type": "ACTSaveTransportMaps", "col": 2, "row": 1,
                        "widgets": {"name": "no_pink_elephant", "overwrite": True}, "links": {"maps": ["fit", 0]}}}
        | _sampling(["apply", 0], ["apply", 1], "a house on a hill, and a pink elephant", 3, "act_no_elephant"),
        "notes": [("Remove a concept, even when the prompt asks for it: the maps learn captions with it vs. "
                   "without it. Fit's 'moves' is 'the concept's words only', made for an object or a colour: "
                   "a prompt that names the concept is read again without its words, and other prompts "
                   "stay exactly as they are; for a style keep 'every token alike'. Raise 'strength' above 1 if traces remain. Save Transport Maps keeps the maps "
                   "in models/act for Load Transport Maps." + CHECKPOINT_NOTE + SLOW_MACHINE, 0, 2)],
    },
    "ACT 4 - add objects (more trees)": {
        "nodes": _learn({"type": "ACTConceptPrompts", "widgets": {"concept": "many tall trees", "direction": "add",
                                                                  "count": PROMPT_COUNT}})
        | _apply(1.0)
        | _sampling(["apply", 0], ["apply", 1], "a quiet street with houses", 3, "act_trees"),
        "notes": [("Add objects no prompt mentions: with direction 'add' the target captions carry the "
                   "concept, so the maps put it into every image. Try 'snow on the ground' or 'a red umbrella'."
                   + CHECKPOINT_NOTE + SLOW_MACHINE, 0, 2)],
    },
    "ACT 5 - strength sweep grid": {
        "nodes": _learn({"type": "ACTStylePrompts", "widgets": {"style": "sketch", "count": PROMPT_COUNT}})
        | {"inspect": {"type": "ACTInspectMaps", "col": 1, "row": 2, "links": {"maps": ["fit", 0]}},
           "sweep": {"type": "ACTStrengthSweep", "col": 2, "row": 0, "widgets": {"strengths": "0, 0.25, 0.5, 0.75, 1"}},
           "chart": {"type": "PreviewImage", "col": 2, "row": 2, "links": {"images": ["inspect", 0]}}}
        | _apply(["sweep", 0], row=1)
        | _sampling(["apply", 0], ["apply", 1], "a lighthouse on a rocky coast", 3, "act_sweep_frame")
        | {"grid": {"type": "ACTStrengthGrid", "col": 5, "row": 0,
                    "links": {"images": ["decode", 0], "strength": ["sweep", 0]}},
           "savegrid": {"type": "SaveImage", "col": 5, "row": 1, "widgets": {"filename_prefix": "act_sweep_grid"},
                        "links": {"images": ["grid", 0]}}},
        "notes": [("See the whole dial at once: one image per strength, labelled side by side and as an "
                   "animation; Inspect shows which layers move most. Edit 'strengths' to zoom in."
                   + CHECKPOINT_NOTE + SLOW_MACHINE + " Fewer strengths, fewer images.", 0, 2)],
    },
    "ACT 6 - load saved maps and apply": {
        "nodes": {"ckpt": {"type": "CheckpointLoaderSimple", "col": 0, "row": 0,
                           "widgets": {"ckpt_name": DEMO_CHECKPOINT}},
                  "fit": {"type": "ACTLoadTransportMaps", "col": 1, "row": 0, "widgets": {"maps_name": DEMO_MAPS}}}
        | _apply(1.0, col=1, row=1)
        | _sampling(["apply", 0], ["apply", 1], "a garden with a pink elephant", 2, "act_loaded", save_col=4),
        "notes": [("Reuse saved maps: no learning, only sampling. Load Transport Maps lists models/act and "
                   f"the demo maps {DEMO_MAPS}, made for the demo checkpoint; maps fit the kind of model they were "
                   "fitted on, so save your own (the 'remove a concept' example does) and pick them here."
                   + CHECKPOINT_NOTE + "\n\nSlow machine or CPU: steps 12 and a 256 px image.", 0, 3)],
    },
}


# FLUX.1-schnell in the files ComfyUI's own FLUX examples use (models/diffusion_models, text_encoders, vae).
# No small FLUX loads through these loaders (their T5-XXL is built full size whatever the file holds), so
# this template is checked up to its model files in CI and runs where the weights are.
FLUX_FILES = {"UNETLoader": {"unet_name": "flux1-schnell.safetensors"},
              "DualCLIPLoader": {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp8_e4m3fn.safetensors"},
              "VAELoader": {"vae_name": "ae.safetensors"}}
# schnell is sampled in 4 steps at cfg 1 (no negative pass); dev in about 20, guidance from FluxGuidance.
FLUX_SAMPLER = {"steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"}
FLUX_SIZE = 1024
# The maps are the same at any batch size; 4 samples of FLUX at 1024 px keep a 24 GB card's peak low.
FLUX_COLLECT = dict(COLLECT, batch_size=4)
FLUX_TITLE = "ACT 7 - FLUX.1 schnell style dial (impressionism)"
SPECS[FLUX_TITLE] = {
    "nodes": {
        "unet": {"type": "UNETLoader", "col": 0, "row": 0,
                 "widgets": dict(FLUX_FILES["UNETLoader"], weight_dtype="default")},
        "clip": {"type": "DualCLIPLoader", "col": 0, "row": 1,
                 "widgets": dict(FLUX_FILES["DualCLIPLoader"], type="flux", device="default")},
        "vae": {"type": "VAELoader", "col": 0, "row": 2, "widgets": dict(FLUX_FILES["VAELoader"])},
        "prompts": {"type": "ACTStylePrompts", "col": 1, "row": 0,
                    "widgets": {"style": "impressionism", "count": PROMPT_COUNT}},
        "collect": {"type": "ACTCollectActivations", "col": 1, "row": 1, "widgets": dict(FLUX_COLLECT),
                    "links": {"model": ["unet", 0], "clip": ["clip", 0], "source_prompts": ["prompts", 0],
                              "target_prompts": ["prompts", 1]}},
        "fit": {"type": "ACTFitTransportMaps", "col": 2, "row": 0, "links": {"activations": ["collect", 0]}},
        "apply": {"type": "ACTApplyTransportMaps", "col": 2, "row": 1, "widgets": {"strength": 1.0},
                  "links": {"model": ["unet", 0], "clip": ["clip", 0], "maps": ["fit", 0]}},
        "neg": {"type": "CLIPTextEncode", "col": 2, "row": 2, "widgets": {"text": ""}, "links": {"clip": ["apply", 1]}},
        "pos": {"type": "CLIPTextEncode", "col": 3, "row": 0, "widgets": {"text": "a harbour full of fishing boats"},
                "links": {"clip": ["apply", 1]}},
        "guidance": {"type": "FluxGuidance", "col": 3, "row": 1, "widgets": {"guidance": 3.5},
                     "links": {"conditioning": ["pos", 0]}},
        "latent": {"type": "EmptySD3LatentImage", "col": 3, "row": 2,
                   "widgets": {"width": FLUX_SIZE, "height": FLUX_SIZE, "batch_size": 1}},
        "decode": {"type": "VAEDecode", "col": 3, "row": 3, "links": {"samples": ["sampler", 0], "vae": ["vae", 0]}},
        "sampler": {"type": "KSampler", "col": 4, "row": 0, "widgets": {"seed": 42, **FLUX_SAMPLER, "denoise": 1.0},
                    "links": {"model": ["apply", 0], "positive": ["guidance", 0], "negative": ["neg", 0],
                              "latent_image": ["latent", 0]}},
        "save": {"type": "SaveImage", "col": 4, "row": 1, "widgets": {"filename_prefix": "act_flux_style"},
                 "links": {"images": ["decode", 0]}},
    },
    "notes": [("FLUX.1 schnell (real weights needed): flux1-schnell.safetensors in models/diffusion_models, "
               "clip_l.safetensors and t5xxl_fp8_e4m3fn.safetensors in models/text_encoders, ae.safetensors in "
               "models/vae. Learns a style in the transformer and both text encoders, then dials it with "
               "'strength'."
               "\n\nFLUX.1 dev: flux1-dev.safetensors, steps 20 (FluxGuidance 3.5 counts; schnell ignores it)."
               "\n\nSmaller GPU: batch_size 1 or 2 (same maps).", 0, 3)],
}


# Z-Image Turbo in the files ComfyUI's own Z-Image example uses; like FLUX, checked up to its model files in
# CI (no small Qwen3-4B loads through CLIPLoader) and run where the weights are.
ZIMAGE_FILES = {"UNETLoader": {"unet_name": "z_image_turbo_bf16.safetensors"},
                "CLIPLoader": {"clip_name": "qwen_3_4b.safetensors"},
                "VAELoader": {"vae_name": "ae.safetensors"}}
# Turbo is distilled for 9 steps at cfg 1 (no negative pass) on res_multistep, with AuraFlow's shift of 3.
ZIMAGE_SAMPLER = {"steps": 9, "cfg": 1.0, "sampler_name": "res_multistep", "scheduler": "simple"}
ZIMAGE_TITLE = "ACT 8 - Z-Image Turbo style dial (anime)"
SPECS[ZIMAGE_TITLE] = {
    "nodes": {
        "unet": {"type": "UNETLoader", "col": 0, "row": 0,
                 "widgets": dict(ZIMAGE_FILES["UNETLoader"], weight_dtype="default")},
        "clip": {"type": "CLIPLoader", "col": 0, "row": 1,
                 "widgets": dict(ZIMAGE_FILES["CLIPLoader"], type="lumina2", device="default")},
        "vae": {"type": "VAELoader", "col": 0, "row": 2, "widgets": dict(ZIMAGE_FILES["VAELoader"])},
        "prompts": {"type": "ACTStylePrompts", "col": 1, "row": 0, "widgets": {"style": "anime", "count": PROMPT_COUNT}},
        "collect": {"type": "ACTCollectActivations", "col": 1, "row": 1, "widgets": dict(FLUX_COLLECT),
                    "links": {"model": ["unet", 0], "clip": ["clip", 0], "source_prompts": ["prompts", 0],
                              "target_prompts": ["prompts", 1]}},
        "fit": {"type": "ACTFitTransportMaps", "col": 2, "row": 0, "links": {"activations": ["collect", 0]}},
        "apply": {"type": "ACTApplyTransportMaps", "col": 2, "row": 1, "widgets": {"strength": 1.0},
                  "links": {"model": ["unet", 0], "clip": ["clip", 0], "maps": ["fit", 0]}},
        "shift": {"type": "ModelSamplingAuraFlow", "col": 2, "row": 2, "widgets": {"shift": 3.0},
                  "links": {"model": ["apply", 0]}},
        "pos": {"type": "CLIPTextEncode", "col": 3, "row": 0, "widgets": {"text": "a harbour full of fishing boats"},
                "links": {"clip": ["apply", 1]}},
        "neg": {"type": "CLIPTextEncode", "col": 3, "row": 1, "widgets": {"text": ""}, "links": {"clip": ["apply", 1]}},
        "latent": {"type": "EmptySD3LatentImage", "col": 3, "row": 2,
                   "widgets": {"width": FLUX_SIZE, "height": FLUX_SIZE, "batch_size": 1}},
        "decode": {"type": "VAEDecode", "col": 3, "row": 3, "links": {"samples": ["sampler", 0], "vae": ["vae", 0]}},
        "sampler": {"type": "KSampler", "col": 4, "row": 0, "widgets": {"seed": 42, **ZIMAGE_SAMPLER, "denoise": 1.0},
                    "links": {"model": ["shift", 0], "positive": ["pos", 0], "negative": ["neg", 0],
                              "latent_image": ["latent", 0]}},
        "save": {"type": "SaveImage", "col": 4, "row": 1, "widgets": {"filename_prefix": "act_zimage_style"},
                 "links": {"images": ["decode", 0]}},
    },
    "notes": [("Z-Image Turbo (real weights needed): z_image_turbo_bf16.safetensors in models/diffusion_models, "
               "qwen_3_4b.safetensors in models/text_encoders (Load CLIP, type lumina2), ae.safetensors in "
               "models/vae. Learns a style in the transformer and in Qwen3-4B, then dials it with 'strength'. "
               "Turbo: 9 steps, cfg 1, res_multistep; ModelSamplingAuraFlow shift 3 goes after Apply."
               "\n\nSmaller GPU: batch_size 1 or 2 on Collect Activations (same maps).", 0, 3)],
}
SHAPES_SDXL_TITLE = "ACT 9 - remove a concept on an SDXL model in seconds (shapes demo model, SDXL)"
SPECS[SHAPES_SDXL_TITLE] = {
    "nodes": _shapes_removal(sdxl=True),
    "notes": [("ACT 1 on shapes-SDXL, a tiny model built like SDXL (CLIP-L and CLIP-G, a pooled vector, SDXL's "
               "UNet blocks) that ships with the pack and knows the same shapes. It goes through ComfyUI's stock "
               "SDXL nodes: Load Checkpoint reads shapes-sdxl-tiny.safetensors, CLIPTextEncodeSDXL encodes "
               "the steered prompt. Fit's 'moves' is left at auto, which picks the concept's words for these pairs. The "
               "grid shows the dial: 0 = the model as it is, 1 = the red square gone, the blue circle kept.\n\n"
               "Below Apply: the same prompt and seed with no maps and the concept as negative prompt. Runs in "
               "seconds, even on a CPU.", 0, 2)],
}
# The templates that need a family's real weights, with the files each one's loaders name: CI checks them
# up to those files.
REAL_WEIGHTS = {FLUX_TITLE: FLUX_FILES, ZIMAGE_TITLE: ZIMAGE_FILES}


def write_all(object_info: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for title, spec in SPECS.items():
        path = out_dir / f"{title}.json"
        path.write_text(json.dumps(build(spec, object_info), indent=1) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    info = json.loads(Path(sys.argv[1]).read_text())
    target = Path(sys.argv[2]) if len(sys.argv) == 3 else Path(__file__).resolve().parent.parent / "example_workflows"
    for p in write_all(info, target):
        print(p)

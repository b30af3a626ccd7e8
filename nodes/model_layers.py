"""What ComfyUI-ACT needs to know about a loaded ComfyUI model: its family and its hookable layers.

Layer names are module paths: "diffusion_model.<module>" inside the MODEL's BaseModel, and
"clip_l.<module>" / "clip_g.<module>" / "clip_h.<module>" inside the CLIP's cond_stage_model.
"""
from __future__ import annotations

import re

import torch

SUPPORTED_FAMILIES = ("SD1.x", "SD2.x", "SDXL")
WHERE = ("diffusion model", "text encoder", "both")
NORM_TYPES = (torch.nn.GroupNorm, torch.nn.LayerNorm)


class ActError(ValueError):
    """A problem the user can fix in the graph; the message says which node and input."""


# ComfyUI reports an error's type as module + class name; the module path of a custom node is the long
# file-system path of the pack, so name it as users know it.
ActError.__module__ = "ComfyUI-ACT"


def model_family(model) -> str:
    """SD1.x, SD2.x or SDXL; any other model raises ActError naming it."""
    import comfy.supported_models as sm
    config = model.model.model_config
    # Subclasses first: SD20 and SDXL variants share these bases.
    if isinstance(config, sm.SDXL):
        return "SDXL"
    if isinstance(config, sm.SD20):
        return "SD2.x"
    if isinstance(config, sm.SD15):
        return "SD1.x"
    raise ActError(f"the MODEL is a {type(config).__name__} model, which ComfyUI-ACT does not support yet; "
                   f"it supports {', '.join(SUPPORTED_FAMILIES)}")


def is_unet_layer(name: str) -> bool:
    return name.startswith("diffusion_model.")


def unet_modules(model) -> dict[str, torch.nn.Module]:
    return {f"diffusion_model.{n}": m for n, m in model.model.diffusion_model.named_modules() if n}


def clip_modules(clip) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in clip.cond_stage_model.named_modules() if n}


def text_encoder_names(clip) -> list[str]:
    """The text encoders inside a CLIP, as attribute names of its cond_stage_model."""
    stage = clip.cond_stage_model
    names = [n for n in ("clip_l", "clip_g", "clip_h") if isinstance(getattr(stage, n, None), torch.nn.Module)]
    if not names:
        raise ActError(f"the CLIP holds a {type(stage).__name__} text encoder, which ComfyUI-ACT does not support yet")
    return names


def select_layers(modules: dict[str, torch.nn.Module], pattern: str | None) -> dict[str, torch.nn.Module]:
    """Normalisation layers (the paper's choice), or every module whose name matches pattern."""
    if not pattern:
        return {n: m for n, m in modules.items() if isinstance(m, NORM_TYPES)}
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise ActError(f"the layer pattern {pattern!r} is not a valid regular expression ({error}); "
                       "fix the 'pattern' input of Collect Activations") from None
    return {n: m for n, m in modules.items() if regex.search(n)}


def output_dim(module: torch.nn.Module) -> int | None:
    """The width of a module's output features when its type tells it, else None."""
    if isinstance(module, torch.nn.GroupNorm):
        return module.num_channels
    if isinstance(module, torch.nn.LayerNorm):
        return int(module.normalized_shape[-1])
    if isinstance(module, torch.nn.Linear):
        return module.out_features
    if isinstance(module, torch.nn.Conv2d):
        return module.out_channels
    return None


def check_maps_fit(maps, model=None, clip=None) -> None:
    """Raise ActError listing every layer of the maps that this MODEL/CLIP lacks or has another width."""
    if model is not None and maps.family and maps.family != model_family(model):
        raise ActError(f"these maps were fitted on an {maps.family} model but the MODEL is {model_family(model)}; "
                       "load maps made for this kind of model, or fit new ones with Fit Transport Maps")
    unet = unet_modules(model) if model is not None else {}
    text = clip_modules(clip) if clip is not None else {}
    problems = []
    for name, layer in maps.items():
        modules = unet if is_unet_layer(name) else text
        if not is_unet_layer(name) and clip is None:
            continue
        module = modules.get(name)
        if module is None:
            problems.append(f"{name}: no such layer")
            continue
        width = output_dim(module)
        if width is not None and width != layer.dim:
            problems.append(f"{name}: {layer.dim} neurons in the maps, {width} in the model")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ActError(f"the maps do not match this model's layers ({len(problems)} of {len(maps)}): {shown}. "
                       "They were made for another model layout; fit maps on this model")

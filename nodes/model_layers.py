"""What ComfyUI-ACT needs to know about a loaded ComfyUI model: its family and its hookable layers.

Layer names are module paths: "diffusion_model.<module>" inside the MODEL's BaseModel, and
"clip_l.<module>" / "clip_g.<module>" / "clip_h.<module>" / "t5xxl.<module>" inside the CLIP's cond_stage_model.
"""
from __future__ import annotations

import re

import torch

from ..act_core.modules import output_dim  # noqa: F401  (the width check below; tests ask here)
from ..act_core.schedules import WHERE  # noqa: F401  (the nodes' 'where' choices, the same in both hosts)
from .errors import ActError
from .families import FAMILIES, NORM_TYPES, SUPPORTED_FAMILIES, family_of, norm_layers  # noqa: F401


def model_family(model, node: str = "Apply Transport Maps") -> str:
    """The family name of a MODEL (see families.FAMILIES); any other model raises ActError naming it
    and `node`."""
    return family_of(model, node).name


def is_unet_layer(name: str) -> bool:
    return name.startswith("diffusion_model.")


def unet_modules(model) -> dict[str, torch.nn.Module]:
    return {f"diffusion_model.{n}": m for n, m in model.model.diffusion_model.named_modules() if n}


def clip_modules(clip) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in clip.cond_stage_model.named_modules() if n}


def text_encoder_names(clip) -> list[str]:
    """The text encoders inside a CLIP, as attribute names of its cond_stage_model."""
    stage = clip.cond_stage_model
    known = dict.fromkeys(e.attribute for f in FAMILIES for e in f.text_encoders)
    names = [n for n in known if isinstance(getattr(stage, n, None), torch.nn.Module)]
    if not names:
        raise ActError(f"the CLIP holds a {type(stage).__name__} text encoder, which ComfyUI-ACT does not support yet")
    return names


def select_layers(modules: dict[str, torch.nn.Module], pattern: str | None,
                  default=norm_layers) -> dict[str, torch.nn.Module]:
    """The family's default layers (`default(name, module)`), or every module whose name matches pattern."""
    if not pattern:
        return {n: m for n, m in modules.items() if default(n, m)}
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise ActError(f"the layer pattern {pattern!r} is not a valid regular expression ({error}); "
                       "fix the 'pattern' input of Collect Activations") from None
    return {n: m for n, m in modules.items() if regex.search(n)}


def check_maps_fit(maps, model=None, clip=None) -> None:
    """Raise ActError listing every layer of the maps that this MODEL/CLIP lacks or has another width."""
    family = model_family(model) if model is not None else None  # an unsupported MODEL is refused alike
    if family is not None and maps.family and maps.family != family:
        raise ActError(f"these maps were fitted on an {maps.family} model but the MODEL is {family}; "
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

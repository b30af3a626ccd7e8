"""Folding a layer's transport map into the layer's weight and bias, as ComfyUI weight patches.

A map that moves every element of a layer's output z by lambda ((scale - 1) z + shift), with no gate,
equals the same layer with each output row of its weight and bias scaled by 1 + lambda (scale - 1) and
lambda * shift added to the bias (`LayerMap.fold`). The patch keeps only the per-neuron vectors
(scale - 1 and shift, float32): O(neurons) memory whatever the size of the weight. ComfyUI computes
the patched weight from the weight it holds at that moment (the original weight plus the clone's
earlier patches: LoRAs, earlier apply nodes), whenever it patches or casts a weight: fully loaded,
offloaded, or partially loaded with weights patched per call (LowVramPatch).

ComfyUI hooks (Create Hook LoRA and the like) add their patches on top of the weights after the
clone's patches; a map folded into a weight a hook also changes must move the hook's change too.
`HookFold` is the callback that does it, right after ComfyUI applied the hooks of a call.
"""
from __future__ import annotations

import logging

import torch

from comfy.weight_adapter.base import WeightAdapterBase

from ..act_core import LayerMap

log = logging.getLogger("comfyui_act")


class FoldedMap(WeightAdapterBase):
    """A weight patch: weight' = weight + strength * (slope * weight [+ shift]), per output row; with no
    slope, a bias shift alone: bias' = bias + strength * shift (a mean-form map's folded shift).

    Built as ComfyUI builds its own adapters, from (loaded_keys, weights): with dynamic VRAM, ComfyUI
    copies each patch's tensors to the device per call and rebuilds the patch as
    type(patch)(patch.loaded_keys, copied weights). weights is [slope, shift], either one None."""

    name = "act_transport_fold"

    def __init__(self, loaded_keys: set, weights: list):
        self.loaded_keys = loaded_keys
        self.weights = list(weights)

    @classmethod
    def of(cls, slope: torch.Tensor | None, shift: torch.Tensor | None) -> "FoldedMap":
        return cls(set(), [None if t is None else t.detach().to(torch.float32).contiguous() for t in (slope, shift)])

    @property
    def slope(self) -> torch.Tensor | None:
        return self.weights[0]

    @property
    def shift(self) -> torch.Tensor | None:
        return self.weights[1]

    def bytes_held(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights if t is not None)

    def calculate_shape(self, key):  # the weight keeps its shape (ComfyUI 0.33 asks)
        return None

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        if self.slope is None:
            delta = self.shift.to(weight.device).expand(weight.shape)
        else:
            rows = self.slope.to(weight.device).view(-1, *([1] * (weight.ndim - 1)))
            delta = weight.to(torch.float32) * rows
            if self.shift is not None:
                delta = delta + self.shift.to(weight.device)
        weight += function(strength * delta).to(weight.dtype)
        return weight


def fold_patches(layer: LayerMap, name: str, strength: float) -> dict[str, FoldedMap]:
    """The weight and bias patches of `layer` (output module `name`) at this strength's sign; the
    patch strength is |strength| (the inverse map is folded for strength < 0)."""
    source = layer.inverse() if strength < 0 else layer
    slope = source.scale - 1.0
    return {f"{name}.weight": FoldedMap.of(slope, None), f"{name}.bias": FoldedMap.of(slope, source.shift)}


def shift_patch(name: str, shift: torch.Tensor) -> dict[str, FoldedMap]:
    """The bias patch (added at patch strength 1) that adds `shift` to module `name`'s output."""
    return {f"{name}.bias": FoldedMap.of(None, shift)}


def has_weight_and_bias(module: torch.nn.Module, dim: int) -> bool:
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor) and weight.ndim >= 1
            and weight.shape[0] == dim and tuple(bias.shape) == (dim,))


def folds_exactly(layer: LayerMap, strength: float) -> bool:
    """Whether folding `layer` gives what the method computes: every element mapped on its own (token
    maps, pixel-form conv maps) and no finite support bound, at this strength's sign."""
    source = layer.inverse() if strength < 0 else layer
    return layer.maps_every_element and not source.gated


class HookFold:
    """ON_APPLY_HOOKS callback of a clone with folded maps. ComfyUI computes a hooked weight as
    hook(folded weight) = folded + delta; the method moves the hooked layer's output, which is
    folded + slope-scaled delta. Where a hook changed a folded key, the delta is scaled here, from
    ComfyUI's backup of the unhooked (folded) weight. Exact for additive hook patches (LoRA, diff).
    Layers patched per call (a LowVramPatch in the module's weight function, or in its lowvram function
    with dynamic VRAM) fold on top of the hook already and are left alone."""

    def __init__(self, rows: dict[str, torch.Tensor]):
        self.rows = rows  # key -> 1 + |lambda| (scale - 1), float32 [D]

    def __call__(self, patcher, hooks) -> None:
        import comfy.model_patcher
        import comfy.utils
        for key, rows in self.rows.items():
            backup = patcher.hook_backup.get(key)
            if backup is None:
                continue
            module_name, _, param = key.rpartition(".")
            module = comfy.utils.get_attr(patcher.model, module_name)
            # Partial loading lists the LowVramPatch among the weight functions; dynamic VRAM (ComfyUI
            # 0.33 and later) keeps it apart, in <param>_lowvram_function.
            functions = [*(getattr(module, f"{param}_function", None) or []),
                         getattr(module, f"{param}_lowvram_function", None)]
            if any(isinstance(f, comfy.model_patcher.LowVramPatch) for f in functions):
                continue
            current = comfy.utils.get_attr(patcher.model, key)
            folded = backup[0].to(device=current.device, dtype=torch.float32)
            scale = rows.to(current.device).view(-1, *([1] * (current.ndim - 1)))
            corrected = folded + scale * (current.to(torch.float32) - folded)
            comfy.utils.copy_to_param(patcher.model, key, corrected.to(current.dtype))


class LaterPatchCheck:
    """ON_LOAD callback of a clone with folded maps. A weight patch added to a folded layer after this
    apply (a LoRA loaded after Apply) is added after the fold, whereas the method moves the output of
    the layer as that patch makes it: say so once, with the fix. Later folds (chained apply nodes)
    compose in graph order and are fine."""

    def __init__(self, patches: dict):
        self.patches = patches  # key -> this apply's FoldedMap
        self.warned = False

    def __call__(self, patcher, *_args, **_kwargs) -> None:
        if self.warned:
            return
        later = []
        for key, mine in self.patches.items():
            entries = patcher.patches.get(key, [])
            at = next((i for i, entry in enumerate(entries) if entry[1] is mine), None)
            if at is not None and any(not isinstance(entry[1], FoldedMap) for entry in entries[at + 1:]):
                later.append(key)
        if later:
            self.warned = True
            log.warning("Apply Transport Maps: a weight patch added after it (a LoRA loaded after Apply) changes %d "
                        "weights Apply folded its maps into (e.g. %s), so the map acts before that patch there. Load "
                        "the LoRA before Apply Transport Maps.", len(later), later[0])

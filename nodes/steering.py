"""Put transport maps on a ComfyUI MODEL or CLIP, functionally: clone, patch the clone, return it.

Each mapped layer is either folded or run per step.
folded: the map becomes weight patches on the layer (nodes/folding.py, the same mechanism as a LoRA):
       no per-step cost, and ComfyUI applies them however it holds the model (fully on the GPU,
       offloaded, or partially loaded with weights cast per call), on top of the clone's earlier
       patches (LoRAs, earlier apply nodes). Each patch holds two per-neuron vectors.
       exact mode folds a layer where the fold is exactly the method: the map moves every element on
       its own (token maps, pixel-form conv maps) with no gate, the layer has a weight and a bias to
       fold into, steering covers the whole sampling window and both branches (the text encoders
       have neither), and no earlier object patch wraps the layer (its output is moved after that
       wrapper's, and a fold would move it before). For a conv map of the mean form (Linear-AcT) it
       folds the shift into the norm's bias and runs the rest, the mean's slope, per step
       (LayerMap.mean_shift_fold): one mean and one multiply-add. "fold all (approximate)" folds
       every map that has a weight and bias to fold into: conv maps of the mean form (Linear-AcT)
       then scale every pixel instead of moving the channel mean, and support ranges are ignored.
per step: diffusion model: an object patch on the .forward of each such layer (wrapping the layer's
       forward and transporting its output) and one on "diffusion_model.forward" that tells them,
       per call, whether this call is steered and which batch rows to move (nodes/per_step.py).
       The per-call state is a stack per thread, so that a diffusion-model call made inside another (a patch that runs the model
       again) is steered on its own terms and the outer call resumes as it was. ComfyUI sets object
       patches when it loads this clone and restores the originals when another clone is loaded, so
       no other clone of the shared nn.Module is touched; per step the cost is one Python call and
       one kernel per layer, with nothing registered or removed.
       Text encoders (run once per prompt, not per step): one object patch on "clip_x.forward" that
       registers forward hooks on the mapped layers for that call and removes them in `finally`.
       Either way, when apply nodes are chained the inner (earlier) node's maps run first, as the
       graph reads. The transport runs one Triton kernel on CUDA (act_core.kernels), the PyTorch
       reference elsewhere.
The sampling window is read at each call from the model_sampling the sampled model holds then, so a
ModelSampling node placed after Apply moves the window with the schedule it sets.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..act_core import LayerMap, TransportMaps, check_strength, kernels
from ..act_core.modules import Hook, hooks_installed
from ..act_core.concept_words import is_concept_words
from . import per_step
from .concept_words import steer_words
from .patching import original_or_patched
from .folding import HookFold, LaterPatchCheck, fold_patches, folds_exactly, has_weight_and_bias, shift_patch
from .model_layers import ActError, check_maps_fit, clip_modules, is_unet_layer, unet_modules

log = logging.getLogger("comfyui_act")

EXACT = "exact"
FOLD_ALL = "fold all (approximate)"
MODES = (EXACT, FOLD_ALL)
# Workflows saved before the rename say "fused": it still does what it did (fold every map).
LEGACY_MODES = {"fused": FOLD_ALL}
BRANCHES = ("conditional and unconditional", "conditional only")


def check_mode(mode: str) -> str:
    """The mode as this version names it; "fused" (older workflows) is "fold all (approximate)"."""
    if mode in MODES:
        return mode
    if mode in LEGACY_MODES:
        return LEGACY_MODES[mode]
    raise ActError(f"mode {mode!r} is unknown; choose one of {', '.join(MODES)} on Apply Transport Maps")


@dataclass
class Placement:
    """Where each mapped layer of one apply went: folded into weights, or run per step. shift_folded:
    the per-step layers (mean-form conv maps) whose shift is folded into the norm's bias, each with
    what is left to run per step (LayerMap.mean_shift_fold). no_weights: the per-step layers with no
    weight and bias to fold into (FLUX.1's and SD3's norms have none), which run per step in any mode."""

    folded: list[str] = field(default_factory=list)
    per_step: list[str] = field(default_factory=list)
    shift_folded: dict[str, LayerMap] = field(default_factory=dict)
    no_weights: list[str] = field(default_factory=list)

    def __iadd__(self, other: "Placement") -> "Placement":
        self.folded += other.folded
        self.per_step += other.per_step
        self.shift_folded.update(other.shift_folded)
        self.no_weights += other.no_weights
        return self

    def summary(self, part: str, when: str = "per step") -> str:
        line = f"{part}: {len(self.folded)} layers folded into weights, {len(self.per_step)} run {when}"
        notes = []
        if self.shift_folded:
            notes.append(f"{len(self.shift_folded)} of them with their shift folded into the norm's bias")
        if self.no_weights:
            notes.append(f"{len(self.no_weights)} of them with no weight and bias to fold into")
        return line + (f" ({'; '.join(notes)})" if notes else "")


def _map_hook(layer_map, strength: float) -> Hook:
    move = kernels.transport(layer_map, strength)

    def hook(_module, _inputs, output):
        return move(output)
    return hook


def _steered_forward(inner: Callable, hooks_for_call: Callable[[tuple, dict], list]):
    def forward(*args, **kwargs):
        hooks = hooks_for_call(args, kwargs)
        if not hooks:
            return inner(*args, **kwargs)
        with hooks_installed(hooks):
            return inner(*args, **kwargs)
    return forward


def steer_model(model, maps: TransportMaps, strength: float, start_percent: float = 0.0,
                end_percent: float = 1.0, branch: str = BRANCHES[0], mode: str = EXACT, fold: bool = True):
    """A clone of MODEL whose diffusion-model activations are transported with `strength`.
    fold=False runs every map per step (the reference the folds are checked against)."""
    return steer_model_placed(model, maps, strength, start_percent, end_percent, branch, mode, fold)[0]


def steer_model_placed(model, maps: TransportMaps, strength: float, start_percent: float = 0.0,
                       end_percent: float = 1.0, branch: str = BRANCHES[0], mode: str = EXACT,
                       fold: bool = True) -> tuple:
    """steer_model, and the Placement of its layers."""
    import comfy.patcher_extension
    strength = check_strength(strength)
    mode = check_mode(mode)
    if branch not in BRANCHES:
        raise ActError(f"branch {branch!r} is unknown; choose one of {', '.join(BRANCHES)} on Apply Transport Maps")
    layers = {n: m for n, m in maps.items() if is_unet_layer(n)}
    check_maps_fit(TransportMaps(layers, maps.info), model=model)
    patched = model.clone()
    if strength == 0.0 or not layers:
        return patched, Placement()
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ActError(f"start_percent ({start_percent}) must not exceed end_percent ({end_percent}); "
                       "fix them on Apply Transport Maps")
    modules = unet_modules(model)
    whole_window = start_percent == 0.0 and end_percent == 1.0
    if whole_window and branch == BRANCHES[0]:
        placement = _fold(patched, layers, modules, strength, mode, fold, mean_shift=True)
    else:
        if mode == FOLD_ALL:
            log.warning("ComfyUI-ACT: folding cannot limit the sampling window or the branch; "
                        "the diffusion model is steered per step (exact)")
        placement = Placement(per_step=list(layers))
    if not placement.per_step:
        return patched, placement
    # Nothing below is bound to the modules of `model`: ComfyUI may set these patches on another copy
    # of the model (nodes/per_step.py), so each resolves its layer in the model running at the call.
    state = per_step.CallState(model.model)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "comfyui_act",
                                 per_step.running_model_wrapper(state))
    for name, rest in placement.shift_folded.items():
        # The norm's bias now holds the shift, so this layer's output is only right with the rest run
        # on it: at every call of the layer, steered or not (the fold acts in every call too).
        key = f"{name}.forward"
        inner = per_step.layer_call(name, patched.object_patches.get(key), state)
        patched.add_object_patch(key, per_step.moved_forward(inner, kernels.transport(rest, 1.0)))
    layers = {n: layers[n] for n in placement.per_step if n not in placement.shift_folded}
    if not layers:
        return patched, placement

    window = None if whole_window else per_step.Window(start_percent, end_percent)
    for name, layer in layers.items():
        key = f"{name}.forward"
        inner = per_step.layer_call(name, patched.object_patches.get(key), state)
        patched.add_object_patch(key, per_step.transported_forward(inner, kernels.transport(layer, strength), state))

    def call_state(args: tuple, kwargs: dict) -> tuple[bool, torch.Tensor | None, torch.Tensor | None]:
        options = kwargs.get("transformer_options") or {}
        sigmas = options.get("sigmas")
        gate = None
        if window is not None and sigmas is not None:
            gate = window.gate(sigmas, state.running().model_sampling)
        if branch == BRANCHES[0]:
            return True, None, gate
        x = args[0] if args else kwargs.get("x")
        rows = state.conditional_rows(options, x.shape[0], x.device)
        # A call that holds only unconditional rows is left alone: nothing to move, nothing to copy.
        return (True, rows, gate) if rows.numel() else (False, None, None)

    key = "diffusion_model.forward"
    inner = per_step.layer_call("diffusion_model", patched.object_patches.get(key), state)
    patched.add_object_patch(key, per_step.call_scoped_forward(inner, call_state, state))
    return patched, placement


def steer_clip(clip, maps: TransportMaps, strength: float, mode: str = EXACT, fold: bool = True):
    """A clone of CLIP whose text-encoder activations are transported with `strength`."""
    return steer_clip_placed(clip, maps, strength, mode, fold)[0]


def steer_clip_placed(clip, maps: TransportMaps, strength: float, mode: str = EXACT, fold: bool = True,
                      remembered=None) -> tuple:
    """remembered: where the concept's words keep what they moved, for the diffusion model to give back
    (nodes/concept_words.py), when the branch or the window is partial."""
    strength = check_strength(strength)
    mode = check_mode(mode)
    layers = {n: m for n, m in maps.items() if not is_unet_layer(n)}
    check_maps_fit(TransportMaps(layers, {}), clip=clip)
    patched = clip.clone()
    conditioning = getattr(maps, "conditioning", None)
    if strength != 0.0 and is_concept_words(conditioning):
        steer_words(patched, clip, conditioning, strength, remembered)
    elif strength != 0.0 and conditioning is not None:  # a gated token map of a version 3 or 4 file
        _steer_conditioning(patched, clip, conditioning, strength)
    if strength == 0.0 or not layers:
        return patched, Placement()
    modules = clip_modules(clip)
    placement = _fold(patched.patcher, layers, modules, strength, mode, fold)
    by_encoder: dict[str, list] = {}
    for name in placement.per_step:
        by_encoder.setdefault(name.split(".", 1)[0], []).append((modules[name], _map_hook(layers[name], strength)))
    stage = clip.cond_stage_model
    for encoder, hooks in by_encoder.items():
        key = f"{encoder}.forward"
        inner = original_or_patched(patched.patcher, key, getattr(stage, encoder), "forward")
        patched.patcher.add_object_patch(key, _steered_forward(inner, lambda _args, _kwargs, h=hooks: h))
    return patched, placement


def _wrapped(patcher, name: str) -> bool:
    """Whether an earlier object patch may move this layer's output: one on the layer's forward, or
    on its text encoder's forward (how text-encoder maps run per encode). The diffusion model's own
    forward patch only sets per-call state."""
    encoder = name.split(".", 1)[0]
    return f"{name}.forward" in patcher.object_patches or (
        encoder != "diffusion_model" and f"{encoder}.forward" in patcher.object_patches)


def _steer_conditioning(patched, clip, conditioning, strength: float) -> None:
    """Move the final conditioning (what CLIPTextEncode outputs) with the gated token map: only the
    tokens that look like the concept's move (act_core/token_transport.py)."""
    stage = clip.cond_stage_model
    width = conditioning.dim
    inner = original_or_patched(patched.patcher, "encode_token_weights", stage, "encode_token_weights")

    def encode(*args, **kwargs):
        out = inner(*args, **kwargs)
        if out[0].shape[-1] != width:
            raise ActError(f"these maps' conditioning map is {width} wide but this CLIP's conditioning is "
                           f"{out[0].shape[-1]}: fit the maps on this model (Fit Transport Maps)")
        return (conditioning.apply(out[0], strength), *out[1:])
    patched.patcher.add_object_patch("encode_token_weights", encode)


def _rounding_dtype(patcher, module: torch.nn.Module) -> torch.dtype:
    """The less precise of the dtype a folded bias is stored in and the one the model computes in."""
    stored = module.bias.dtype
    computed = getattr(patcher.model, "manual_cast_dtype", None) or stored
    return max((stored, computed), key=lambda dtype: torch.finfo(dtype).eps)


def _fold(patcher, layers: dict, modules: dict, strength: float, mode: str, fold: bool,
          mean_shift: bool = False) -> Placement:
    """Fold into weight patches on `patcher` what the mode folds; the rest is left to run per step.
    mean_shift: in exact mode, fold the shift of mean-form conv maps into the norm's bias too (only
    where every call of the layer is steered: the whole window, both branches)."""
    import comfy.patcher_extension
    placement = Placement()
    patches: dict = {}
    shifts: dict = {}
    rows: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        keys = (f"{name}.weight", f"{name}.bias")
        can = fold and has_weight_and_bias(modules[name], layer.dim)
        if fold and not can:
            placement.no_weights.append(name)
        if can and mode == EXACT:
            # A fold moves the layer's output before an earlier object patch's change, which the method
            # moves after it: only layers nothing else wraps fold.
            clear = not _wrapped(patcher, name) and not any(k in patcher.weight_wrapper_patches for k in keys)
            split = (layer.mean_shift_fold(strength, _rounding_dtype(patcher, modules[name]))
                     if clear and mean_shift else None)
            if split is not None:
                shifts.update(shift_patch(name, split[0]))
                placement.shift_folded[name] = split[1]
            can = clear and folds_exactly(layer, strength)
        if not can:
            placement.per_step.append(name)
            continue
        placement.folded.append(name)
        layer_patches = fold_patches(layer, name, strength)
        patches.update(layer_patches)
        for key, patch in layer_patches.items():
            rows[key] = 1.0 + abs(strength) * patch.slope
    # A shift folded into a bias adds to whatever the bias is (LoRAs and hooks before or after it):
    # no hook correction and no order check are needed for it.
    if shifts:
        missing = sorted(set(shifts) - set(patcher.add_patches(shifts, 1.0)))
        if missing:
            raise ActError(f"ComfyUI refused bias patches for {len(missing)} layers (e.g. {missing[0]}); "
                           "report the model")
    if patches:
        accepted = set(patcher.add_patches(patches, abs(strength)))
        missing = sorted(set(patches) - accepted)
        if missing:
            raise ActError(f"ComfyUI refused weight patches for {len(missing)} layers (e.g. {missing[0]}); "
                           "set mode 'exact' on Apply Transport Maps and report the model")
        patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_APPLY_HOOKS, HookFold(rows))
        patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_LOAD, LaterPatchCheck(patches))
    return placement
